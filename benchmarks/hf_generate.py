"""transformers ``generate()`` on ``EngramForCausalLM`` against the project's own generation, same model,
same prompts, same process (target: >= 0.9x for greedy decoding of 128 tokens, batch 1 and 8).

The model is ``demo-engram`` (random weights: speed does not depend on them; EOS is switched off so
every call generates exactly ``--new-tokens``). Both sides decode greedily with a cache: native
``engram.infer.generate_batch`` and ``EngramForCausalLM.generate(do_sample=False)``; calls alternate
(``timing.time_calls``) so load from other processes hits both alike. The tokens are checked equal.

    python benchmarks/hf_generate.py [--preset demo-engram] [--prompt-len 32] [--new-tokens 128]
                                     [--batches 1 8] [--repeats 5] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from timing import time_calls

import engram.hf as H
from engram.infer import generate_batch
from engram.model.transformer import EngramLM
from engram.presets import get_run_preset
from engram.tokenizer import CompressedTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo-engram")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = get_run_preset(args.preset).model
    vocab = config.backbone.vocab_size
    torch.manual_seed(0)
    native = EngramLM(config, CompressedTokenizer.identity(vocab)).eval()
    hf = H.to_hf(native)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rows = []
    for batch in args.batches:
        prompts = torch.randint(3, vocab, (batch, args.prompt_len))

        def run_native():
            return generate_batch(native, prompts.tolist(), args.new_tokens, temperature=0.0)

        def run_hf():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)

        assert torch.equal(run_hf()[:, args.prompt_len:], torch.tensor(run_native())), "generations differ"
        times = time_calls({"native": run_native, "hf": run_hf}, repeats=args.repeats, warmup=1)
        tokens = batch * args.new_tokens
        row = {"batch": batch, "new_tokens": args.new_tokens,
               "native_tokens_per_s": round(tokens / times["native"]["median_s"], 1),
               "hf_tokens_per_s": round(tokens / times["hf"]["median_s"], 1),
               "hf_vs_native": round(times["native"]["median_s"] / times["hf"]["median_s"], 3)}
        rows.append(row)
        print(f"batch {batch}: native {row['native_tokens_per_s']:,.1f} tok/s, HF generate "
              f"{row['hf_tokens_per_s']:,.1f} tok/s, ratio {row['hf_vs_native']:.3f} (target >= 0.9)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
