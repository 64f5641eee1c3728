"""The base model of ``engram finetune``: what it is, read before its weights are loaded, and how it loads.

``describe_base`` reads only the base's configuration and a fingerprint of its weight files, so that a base
of the wrong kind (an Engram model, a vocabulary smaller than its tokenizer's) is refused in a second, not
after the weights have loaded, and a resumed run can check that it continues on the base it started with:

    {"model_type", "hidden_size", "num_hidden_layers", "vocab_size",   the architecture (base_identity's fields)
     "revision",                                                       the hub commit of a hub base (None: a folder)
     "files": {name: {"bytes", "sampled_sha256"}},                     each weight file: its size and the sha256
                                                                       of its first and last MiB (a full sha256
                                                                       of a 15 GB base would take half a minute)
     "tokenizer_sha256"}                                               the tokenizer's JSON, as the run uses it
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

SAMPLE_BYTES = 1 << 20
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin", "consolidated*.pth", "*.gguf")  # not optimizer.pt, ...


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size, first MiB and last MiB: cheap, and it tells two checkpoints apart."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def load_tokenizer(config):
    """The base's own tokenizer (``config``: a ``FinetuneConfig``)."""
    from transformers import AutoTokenizer

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    return AutoTokenizer.from_pretrained(config.base, **extra)


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def describe_base(config, tokenizer) -> dict:
    """The base's architecture, weight-file fingerprints and tokenizer (module docstring); ValueError for a
    base ``engram finetune`` cannot retrofit. Reads no weights."""
    import engram.hf  # noqa: F401  (registers model_type "engram", so AutoConfig can name it)
    from transformers import AutoConfig

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    hf_config = AutoConfig.from_pretrained(config.base, **extra)
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "engram":
        raise ValueError(f"{config.base} is an Engram model already (model_type 'engram'): engram finetune retrofits "
                         "an adapter onto a plain transformers model; continue training this one with "
                         "`engram train --init-from` on its native checkpoint")
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the base's tokenizer has {len(tokenizer)} ids but its model's vocabulary holds {vocab}: "
                         f"ids from {vocab} on would index past the embedding; use the tokenizer the model was "
                         "trained with (or resize the model's embeddings first)")
    folder = Path(config.base)
    names = [config.gguf_file] if config.gguf_file else sorted(
        {p.name for pattern in WEIGHT_FILES for p in folder.glob(pattern)}) if folder.is_dir() else []
    return {"model_type": model_type, "revision": getattr(hf_config, "_commit_hash", None),
            "hidden_size": getattr(text, "hidden_size", None),
            "num_hidden_layers": getattr(text, "num_hidden_layers", None), "vocab_size": vocab,
            "files": {name: {"bytes": (folder / name).stat().st_size, "sampled_sha256": sampled_sha256(folder / name)}
                      for name in names if (folder / name).is_file()},
            "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def check_same_base(stored: dict, now: dict, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` (trained on ``stored``) on another base, naming what differs."""
    differ = [key for key in ("model_type", "revision", "hidden_size", "num_hidden_layers", "vocab_size", "files",
                              "tokenizer_sha256") if stored.get(key) != now.get(key)]
    if differ:
        what = {"files": "its weight files", "tokenizer_sha256": "its tokenizer", "revision": "its hub revision"}
        raise ValueError(f"{checkpoint} was trained on another base model ({', '.join(what.get(k, k) for k in differ)}"
                         " differ): an adapter continues on the base it started with; give that --base, or "
                         "--no-resume to start afresh (the old history is moved to the archive)")


def load_model(config):
    """The base model in fp32, in eval mode (dropout off: the frozen base is a function)."""
    from transformers import AutoModelForCausalLM

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32, **extra).eval()
