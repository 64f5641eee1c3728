"""CompressedTokenizer: the paper's vocabulary projection for the Engram path (docs/ALGORITHM.md §2 step 1).

Raw ids whose decoded text normalises to the same key (case, accents, runs of whitespace) share one
compressed id, so " Apple", "apple" and "APPLE" address the same n-gram rows. The backbone keeps raw ids;
only hashing uses compressed ids. The table is built once per tokenizer and saved beside checkpoints
(multipliers depend on V', docs/PITFALLS.md §3).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPLACEMENT_CHAR = "\ufffd"
_SENTINEL = "\ue000"
COMPRESSED_FILE = "compressed_tokenizer.safetensors"
_FILE = COMPRESSED_FILE


def _normaliser():
    """NFKC -> NFD -> strip accents -> lowercase -> collapse whitespace -> strip, keeping a lone space.

    Built with Hugging Face ``tokenizers`` normalisers so the Unicode tables (and Rust's lowercase)
    match the reference exactly; Python's ``unicodedata``/``str.lower`` can differ on rare code points.
    """
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),  # a token that *is* whitespace keeps one space
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def compress_vocabulary(texts: list[str], raw_tokens: Callable[[int], str]) -> tuple[np.ndarray, int]:
    """Map raw id i (with decoded text ``texts[i]``) to a compressed id; returns (lookup, V').

    Keys get new ids in first-seen order over i = 0, 1, 2, ... A text containing U+FFFD (a partial
    UTF-8 byte sequence) is keyed by its raw token string instead, so distinct byte pieces stay apart.
    """
    normalise = _normaliser().normalize_str
    keys: dict[str, int] = {}
    lookup = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if REPLACEMENT_CHAR in text:
            key = raw_tokens(i)
        else:
            key = normalise(text) or text
        lookup[i] = keys.setdefault(key, len(keys))
    return lookup, len(keys)


def _decode_all(tokenizer: Any) -> tuple[list[str], Callable[[int], str]]:
    """Decoded text of every raw id, one id at a time, from a transformers or tokenizers object."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        return texts, lambda i: tokenizer.id_to_token(i) or ""
    if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "decode"):
        # transformers: decode() as the reference does (it may clean up spaces; keys are stripped anyway).
        n = len(tokenizer)
        texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(n)]
        return texts, lambda i: tokenizer.convert_ids_to_tokens(i) or ""
    raise TypeError(
        "CompressedTokenizer.from_pretrained expects a transformers tokenizer, a tokenizers.Tokenizer, "
        f"a directory holding tokenizer.json, or a tokenizer.json path; got {type(tokenizer).__name__}")


def read_tokenizer_file(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json; ValueError naming the file when it cannot be parsed
    (``tokenizers`` raises a bare ``Exception`` for malformed JSON or an unknown model)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (tokenizers' error type is Exception itself)
        if isinstance(err, OSError):
            raise
        raise ValueError(f"{path} is not a readable tokenizer.json ({err}); replace it with the tokenizer's "
                         "original file") from None


def _load_tokenizer_file(path: Path):
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return read_tokenizer_file(path)


def _sha256(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype="<i8").tobytes()).hexdigest()


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "the tokenizer's range",
                    allow_negative: bool = True) -> tuple[int, int]:
    """The one check of raw token ids: raise ValueError naming the first id >= ``vocab_size`` (an id past a
    table never wraps around, docs/PITFALLS.md §2), or the first negative id unless ``allow_negative`` (hashers map
    those to the pad id); returns (min, max). One host sync per batch, never per layer. Tensors on the meta
    device carry no values to check."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.device.type == "meta" or ids.numel() == 0:
        return 0, 0
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if hi >= vocab_size or (lo < 0 and not allow_negative):
        bad = (ids >= vocab_size) | ((ids < 0) & (not allow_negative))
        raise ValueError(f"token id {ids[bad][0].item()} is outside {what} [0, {vocab_size}) "
                         f"({int(bad.sum())} bad id(s) in the batch)")
    return lo, hi


class CompressedTokenizer:
    """raw id -> compressed id, as an int64 lookup table.

    Attributes: ``lookup`` (int64 tensor of length ``raw_vocab_size``), ``vocab_size`` (V'),
    ``raw_vocab_size`` (len of the source tokenizer), ``sha256`` of the table (little-endian int64).
    """

    def __init__(self, lookup: torch.Tensor | np.ndarray, vocab_size: int | None = None):
        # a host-side table, whatever default device is active (EngramLM builds its modules under meta)
        lookup = torch.as_tensor(np.asarray(lookup, dtype=np.int64), device="cpu").clone()
        if lookup.dim() != 1 or lookup.numel() == 0:
            raise ValueError(f"lookup must be a non-empty 1-D table, got shape {tuple(lookup.shape)}")
        lo, hi = int(lookup.min()), int(lookup.max())
        if vocab_size is None:
            vocab_size = hi + 1
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"lookup values must lie in [0, {vocab_size}), found [{lo}, {hi}]")
        self.lookup = lookup
        self.vocab_size = int(vocab_size)
        self._devices: dict[torch.device, torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, tokenizer: Any) -> "CompressedTokenizer":
        """Build from a transformers tokenizer, a ``tokenizers.Tokenizer``, a directory or a tokenizer.json.

        Paths are read with ``tokenizers`` directly (no transformers needed); with the DeepSeek-V4
        tokenizer both paths give the reference table (V' = 99,092).
        """
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer_file(Path(tokenizer))
        texts, raw_tokens = _decode_all(tokenizer)
        lookup, vocab_size = compress_vocabulary(texts, raw_tokens)
        return cls(lookup, vocab_size)

    @classmethod
    def identity(cls, raw_vocab_size: int) -> "CompressedTokenizer":
        """No compression: compressed id = raw id (the "no tokenizer compression" ablation)."""
        return cls(np.arange(raw_vocab_size, dtype=np.int64), raw_vocab_size)

    # -- use ----------------------------------------------------------------------------------
    @property
    def raw_vocab_size(self) -> int:
        return self.lookup.numel()

    @property
    def sha256(self) -> str:
        return _sha256(self.lookup.numpy())

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The lookup table on ``device``, copied once and cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.lookup
        if device not in self._devices:
            self._devices[device] = self.lookup.to(device)
        return self._devices[device]

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ValueError naming the first raw id outside [0, raw_vocab_size) (never wrap around)."""
        check_token_ids(ids, self.raw_vocab_size, allow_negative=False)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Compressed ids for a tensor of raw ids, on the ids' device. Bad ids raise ValueError."""
        ids = torch.as_tensor(ids)
        self.check_ids(ids)
        return self.table_on(ids.device)[ids.long()]

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CompressedTokenizer) and self.vocab_size == other.vocab_size
                and torch.equal(self.lookup, other.lookup))

    def __repr__(self) -> str:
        saved = 1 - self.vocab_size / self.raw_vocab_size
        return (f"CompressedTokenizer(raw_vocab_size={self.raw_vocab_size}, vocab_size={self.vocab_size}, "
                f"compression={saved:.2%})")

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``compressed_tokenizer.safetensors`` (table + V' + sha256) atomically into ``directory``."""
        from safetensors.torch import save

        from engram.fileio import atomic_write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": str(self.vocab_size), "sha256": self.sha256, "format": "engram.compressed_tokenizer/1"}
        return atomic_write_bytes(directory / _FILE, save({"lookup": self.lookup.contiguous()}, metadata=meta))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressedTokenizer":
        """Read what ``save`` wrote; a missing, truncated or altered file raises ValueError."""
        from safetensors import SafetensorError, safe_open

        path = Path(directory)
        if path.is_dir():
            path = path / _FILE
        if not path.is_file():
            raise FileNotFoundError(f"no compressed tokenizer at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                lookup = f.get_tensor("lookup")
        except (SafetensorError, OSError, KeyError) as err:
            raise ValueError(f"{path} is not a readable compressed tokenizer file ({err})") from err
        if "vocab_size" not in meta or "sha256" not in meta:
            raise ValueError(f"{path} lacks the vocab_size/sha256 metadata of a compressed tokenizer")
        tok = cls(lookup, int(meta["vocab_size"]))
        if tok.sha256 != meta["sha256"]:
            raise ValueError(f"{path} is corrupted: lookup sha256 {tok.sha256} != stored {meta['sha256']}")
        return tok

    def describe(self) -> dict[str, Any]:
        """JSON-able summary stored with hash layouts and checkpoints."""
        return {"raw_vocab_size": self.raw_vocab_size, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def to_json(self) -> str:
        return json.dumps(self.describe())
