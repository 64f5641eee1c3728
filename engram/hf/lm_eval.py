"""lm-evaluation-harness adapter (optional extra ``engram-lm[eval]``, tested with lm_eval 0.4.13): the
model name ``"engram"``, registered on import.

    import engram.hf.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="engram", model_args="pretrained=DIR", tasks=["hellaswag"])

    python -m engram.hf.lm_eval --model engram --model_args pretrained=DIR --tasks hellaswag

``DIR`` is a folder written by ``EngramForCausalLM.save_pretrained`` or ``engram.hf.export_hf``;
``pretrained`` may also be an ``EngramForCausalLM`` (model_args as a dict). Every other model_arg is
lm_eval's ``HFLM``'s (batch_size, device, dtype, max_length, ...): ``EngramHFLM`` is an ``HFLM`` that

  - prepends BOS to every context by default (``add_bos_token=True`` when the tokenizer has a BOS):
    our models were trained with ``[bos] + ids`` for every document, so scoring without it would
    measure them on inputs they never saw; ``add_bos_token=False`` in model_args turns it off;
  - scores with plain forwards: HFLM calls ``model(ids)``, which in eval mode would also build a
    decode cache (transformers' ``use_cache`` default) that scoring never reads. Its right-padded
    batches need no mask: the model is causal (padding after a row's tokens never reaches them) and
    its MoE has no capacity limit (padding never displaces a real token from an expert).
    ``generate_until`` goes through ``generate()`` with left padding, which the model supports;
  - scores a whole text (``loglikelihood_rolling``, perplexity tasks) after one BOS, where HFLM would
    put two when ``add_bos_token`` is on.

Why ``python -m engram.hf.lm_eval`` rather than ``lm_eval --model engram``: the ``lm_eval`` script of
0.4.13 resolves ``--model`` in a registry filled from a fixed table (``lm_eval.models.MODEL_MAPPING``)
and loads no plugins (no entry points are scanned), so a third-party model is found only when its
module was imported first. Run as a module, this file registers the model, then runs lm_eval's own CLI
with the arguments unchanged (``main``; the project's CLI exposes it as ``engram lm-eval``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("engram.hf.lm_eval needs lm-eval and accelerate (lm-eval's HFLM imports it): "
                      "pip install 'engram-lm[eval]'") from err

from engram.hf import EngramForCausalLM, hf_tokenizer

__all__ = ["EngramHFLM", "main"]


@register_model("engram")
class EngramHFLM(HFLM):
    """lm_eval's ``HFLM`` for ``EngramForCausalLM`` (see the module docstring for what differs)."""

    def __init__(self, pretrained: str | EngramForCausalLM, tokenizer=None, add_bos_token: bool | None = None,
                 device: str | None = None, backend: str = "causal", **kwargs):
        if isinstance(pretrained, EngramForCausalLM) and tokenizer is None:
            if pretrained.engram_tokenizer is None:
                raise ValueError("this EngramForCausalLM carries no tokenizer (to_hf(model, tokenizer) gives it one): "
                                 "pass tokenizer= as well")
            tokenizer = hf_tokenizer(pretrained.engram_tokenizer)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # HFLM's default, cuda, fails without one
        super().__init__(pretrained, tokenizer=tokenizer, add_bos_token=add_bos_token, device=device,
                         backend=backend, **kwargs)
        if add_bos_token is None:
            self.add_bos_token = self.tokenizer.bos_token_id is not None
        # HFLM encodes with add_special_tokens=add_bos_token, which adds what the tokenizer's post-processor
        # says; setting the flag rebuilds that post-processor (transformers' fast tokenizer) to add BOS alone
        self.tokenizer.add_bos_token = self.add_bos_token

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text scored after one BOS. HFLM puts ``prefix_token_id`` (BOS) before its first window and
        also encodes the text with ``add_bos_token``: two BOS, and log p(BOS | BOS) added to the score."""
        add_bos, self.add_bos_token = self.add_bos_token, False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = add_bos

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """inps (B, T) right-padded -> logits (B, T, V), without building a decode cache."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, use_cache=False).logits

    def get_model_info(self) -> dict:
        """HFLM's, less the hub lookup: a local folder has no hub revision, and a relative path that
        looks like a repo id would send a request to the hub."""
        if not isinstance(self.pretrained, str) or Path(self.pretrained).is_dir():
            return {"model_num_parameters": self.model.num_parameters(), "model_dtype": self.model.dtype,
                    "model_revision": None, "model_sha": ""}
        return super().get_model_info()


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line (``lm_eval ARGS``) with the ``engram`` model registered; returns the exit
    status. ``argv``: the arguments after the program name (default ``sys.argv[1:]``)."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # lm_eval's CLI parses sys.argv and offers no argv parameter
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse (--help, bad arguments)
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
