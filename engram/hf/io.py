"""The tokenizer files of a saved ``EngramForCausalLM`` folder, and the check that they address the same
table rows as the weights (docs/PITFALLS.md §3, §4: another tokenizer, or another tokenizers version, would
scramble every Engram row).

    config.json, model.safetensors, generation_config.json    transformers' own
    compressed_tokenizer.safetensors                          the raw -> compressed id table the rows were addressed with
    tokenizer.json, tokenizer_config.json                     the raw tokenizer (AutoTokenizer; padding_side left)
"""

from __future__ import annotations

import os
from pathlib import Path

from engram.tokenizer import COMPRESSED_FILE, CompressedTokenizer, read_tokenizer_file


def _find(folder, name: str, kwargs: dict) -> Path | None:
    """A file of a saved folder (a local directory, or a hub repo already in the local cache)."""
    from transformers.utils import cached_file

    local = Path(str(folder)) / name
    if local.is_file():
        return local
    options = {k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")
               if k in kwargs}
    found = cached_file(str(folder), name, _raise_exceptions_for_missing_entries=False, **options)
    return Path(found) if found else None


def folder_tokenizers(folder, kwargs: dict | None = None):
    """(CompressedTokenizer or None, tokenizers.Tokenizer or None) of a saved folder. ``tokenizer.json``, when
    present, is the source: the compressed table is rebuilt from it and must equal the stored one. Neither
    file gives (None, None): ``EngramForCausalLM`` then loads only a model that hashes nothing (or whose
    stored layout says its compression is the identity)."""
    kwargs = kwargs or {}
    tokenizer_file = _find(folder, "tokenizer.json", kwargs)
    stored_file = _find(folder, COMPRESSED_FILE, kwargs)
    stored = CompressedTokenizer.load(stored_file.parent) if stored_file is not None else None
    if tokenizer_file is None:  # neither: a model that hashes nothing needs none (the model refuses otherwise)
        return stored, None
    tokenizer = read_tokenizer_file(tokenizer_file)
    rebuilt = CompressedTokenizer.from_pretrained(tokenizer)
    n = rebuilt.raw_vocab_size
    if stored is not None and stored.raw_vocab_size > n and stored.vocab_size == rebuilt.vocab_size and \
            bool((stored.lookup[:n] == rebuilt.lookup).all()):
        return stored, tokenizer  # a vocabulary padded past the tokenizer (resize_token_embeddings): its table
    if stored is not None and rebuilt != stored:
        raise ValueError(f"{tokenizer_file} compresses to V'={rebuilt.vocab_size} (sha256 {rebuilt.sha256[:12]}) but "
                         f"the tables in {folder} were addressed with V'={stored.vocab_size} (sha256 "
                         f"{stored.sha256[:12]}): the tokenizer was changed or replaced; refusing to load")
    return rebuilt, tokenizer


def save_tokenizers(model, directory: str | os.PathLike) -> None:
    """Write the compressed table and, when known, the tokenizer beside the weights."""
    directory = Path(directory)
    if model.compressed_tokenizer is not None:
        model.compressed_tokenizer.save(directory)
    tokenizer = model.engram_tokenizer
    if tokenizer is not None:
        max_length = getattr(model.config, "max_position_embeddings", None)
        hf_tokenizer(tokenizer, model_max_length=max_length).save_pretrained(str(directory))


def hf_tokenizer(tokenizer, model_max_length: int | None = None):
    """A transformers ``PreTrainedTokenizerFast`` over a ``tokenizers.Tokenizer`` (a copy; the object given is
    not changed): left padding, the BOS prepended as training documents start (``engram.data.prompt_ids``:
    ``tok(text)`` gives ``[<|bos|>] + ids``, so ``pipeline`` prompts are ``engram sample``'s), decoding as
    ``tokenizers`` does, and ``model_max_length`` (the model's context) when given."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from engram.data import special_ids

    special = special_ids(tokenizer)
    names = {role: tokenizer.id_to_token(i) for role, i in (("bos_token", special.bos), ("eos_token", special.eos),
                                                            ("pad_token", special.pad)) if i is not None}
    extra = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), padding_side="left",
                                   add_bos_token=special.bos is not None, clean_up_tokenization_spaces=False,
                                   **names, **extra)
