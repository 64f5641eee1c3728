"""Byte-level BPE training and tokenizer loading, with fixed special-token ids.

Byte-level (GPT-2 style) so any text, code included, round-trips exactly with no unknown token: the
256 byte symbols are always in the vocabulary. The special tokens take ids 0, 1, 2 in a fixed order so
configs can name them without a tokenizer at hand (``EngramConfig.pad_id`` etc.).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # order = id
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Spellings of the same roles in common foreign tokenizers (ours first; DeepSeek; Llama/T5; BERT;
# GPT-2 uses <|endoftext|> as both bos and eos).
_CANDIDATES = {
    "pad": [PAD, "<｜▁pad▁｜>", "<pad>", "[PAD]", "<|padding|>"],
    "bos": [BOS, "<｜begin▁of▁sentence｜>", "<s>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>"],
    "eos": [EOS, "<｜end▁of▁sentence｜>", "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>"],
}


class SpecialIds(NamedTuple):
    pad: int | None
    bos: int | None
    eos: int | None


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Ids of the pad/bos/eos tokens of any tokenizer, by their usual spellings; None where absent."""
    def find(role: str) -> int | None:
        for token in _CANDIDATES[role]:
            i = tokenizer.token_to_id(token)
            if i is not None:
                return i
        return None

    return SpecialIds(find("pad"), find("bos"), find("eos"))


def with_bos(ids: Iterable[int], bos: int | None) -> list[int]:
    """``ids`` as a training document starts: ``[bos] + ids`` (no prefix when there is no bos)."""
    return ([bos] if bos is not None else []) + list(ids)


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` encoded as training documents start (``[<|bos|>] + ids``, ``write_split``'s layout), the one
    way a prompt is encoded for sampling, generation and evaluation."""
    # add_special_tokens=False, as the shards encode: the BOS is ours to add, never a post-processor's (an
    # exported tokenizer.json adds it for transformers' users)
    return with_bos(tokenizer.encode(text, add_special_tokens=False).ids, special_ids(tokenizer).bos)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids (fewer if the text runs out of merges).

    Deterministic for the same texts in the same order: the trainer breaks count ties by the pair
    itself, never by hash order or thread timing.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word is not silently given a leading space, so
    # decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes even if unseen
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    got = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [PAD_ID, BOS_ID, EOS_ID]:  # guards against a tokenizers release reordering them
        raise RuntimeError(f"special tokens got ids {got}, expected {[PAD_ID, BOS_ID, EOS_ID]}")
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a directory holding one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {str(path)!r}: expected a tokenizer.json file or a "
                                f"directory holding one (or DataConfig.tokenizer='bpe' to train one)")
    from engram.tokenizer import read_tokenizer_file

    return read_tokenizer_file(file)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: ties shards and caches to the exact tokenizer."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
