"""Knock-out on two probe sets from held-out data (docs/ALGORITHM.md §5: with Engram's output zeroed, factual recall
keeps 29-44% of its score, reading comprehension 81-93%); ``engram inspect knockout``.

Our analogue of that split, for a code corpus:
- **static** probes: frequent multi-token names and idioms (``os.path.join``, ``isinstance(``) mined from
  the train split as token 3-5-grams; each occurrence in the validation split is a probe whose target is
  the pattern's last token, predicted from its real context. A lookup table can store these.
- **in-context** probes: a multi-token identifier that is rare in the train split (so no table learned
  it), defined in a validation document (after ``def``/``class``, or before ``=``) and used again later
  in the same document; the targets are its continuation tokens at the later use. Only the context
  tells the model what comes next.

Every validation position is scored once (top-1 correct, log-prob of the true token) in overlapping
windows that give it at least half a window of context, with and without Engram; a probe set's score is
the mean over its target tokens, and retention = accuracy without / accuracy with.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram.analysis.hooks import capture_gates, knockout, storage_report
from engram.fileio import atomic_write_json
from engram.model.tables import as_table_host

# words joined by "." or one space, optionally opening a call or subscript: os.path.join, raise ValueError(
STATIC_SHAPE = re.compile(r"[A-Za-z_]\w*(?:[. ][A-Za-z_]\w*)*[(\[]?")
FRAGMENT = re.compile(r"_\w*|\w*_")  # a bare piece of a longer name: _to_, _check_
WORD_START = re.compile(r" ?[A-Za-z_]\w*")
WORD_PART = re.compile(r"\w+")
WORD = re.compile(r"[A-Za-z_]\w*")


def vocab_pieces(tokenizer) -> list[str]:
    """The text of every token id alone ("" for special tokens)."""
    return [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]


def read_split(shards, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split's shards as one (n,) int64 array and the sorted document starts (n_docs,); documents
    never span shards, so a shard's start is a document start. At most ``max_tokens`` tokens."""
    ids, starts, offset = [], [], 0
    for tokens, doc_starts in zip(shards.tokens, shards.doc_starts):
        if max_tokens is not None and offset >= max_tokens:
            break
        take = len(tokens) if max_tokens is None else min(len(tokens), max_tokens - offset)
        ids.append(np.asarray(tokens[:take], dtype=np.int64))
        starts.append(doc_starts[doc_starts < take] + offset)
        offset += take
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.unique(np.concatenate(starts + [np.array([0])]))


def _windows(ids: np.ndarray, doc_starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All n-token windows (M, n) and whether each lies inside one document (M,)."""
    grams = np.lib.stride_tricks.sliding_window_view(ids, n)  # (M, n), a view
    is_start = np.zeros(len(ids), dtype=np.int64)
    is_start[doc_starts] = 1
    cs = np.cumsum(is_start)
    inside = cs[n - 1:] - cs[: len(ids) - n + 1] == 0  # no document starts after a window's first token
    return grams, inside


@dataclass
class Pattern:
    ids: tuple[int, ...]
    text: str
    count: int  # occurrences in the mined split


def mine_static_patterns(ids: np.ndarray, doc_starts: np.ndarray, pieces: list[str], orders=(3, 4, 5),
                         top: int = 300, min_count: int = 10) -> list[Pattern]:
    """The ``top`` most frequent token n-grams (n in ``orders``) that read as a name or idiom
    (``STATIC_SHAPE`` after leading spaces; no special token, digit or bare ``_fragment_``) and occur at
    least ``min_count`` times."""
    candidates: list[Pattern] = []
    small = ids.astype(np.uint16 if len(pieces) <= 2**16 else np.uint32)
    for n in orders:
        if len(ids) < n:
            continue
        grams, inside = _windows(small, doc_starts, n)
        rows = np.ascontiguousarray(grams[inside])
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * n)))[:, 0]  # one opaque key per row
        uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        kept = 0
        for k in order:
            if counts[k] < min_count or kept >= 4 * top:
                break
            gram = tuple(int(t) for t in rows[first[k]])
            parts = [pieces[t] for t in gram]
            text = "".join(parts).lstrip(" ")
            if (all(parts) and STATIC_SHAPE.fullmatch(text) and not FRAGMENT.fullmatch(text)
                    and not any(ch.isdigit() for ch in text)):  # digits: hex tables (x00b), not names
                candidates.append(Pattern(gram, text, int(counts[k])))
                kept += 1
    candidates.sort(key=lambda p: (-p.count, -len(p.ids), p.text))
    return candidates[:top]


@dataclass
class Probe:
    kind: str  # "static" or "in_context"
    targets: list[int]  # positions of the target tokens (each predicted from the position before it)
    text: str


def static_probes(ids: np.ndarray, doc_starts: np.ndarray, patterns: list[Pattern]) -> list[Probe]:
    """Every occurrence of a pattern inside one document; at a target position the longest pattern wins."""
    by_order: dict[int, dict[bytes, Pattern]] = {}
    for p in patterns:
        by_order.setdefault(len(p.ids), {})[np.asarray(p.ids, dtype=np.int64).tobytes()] = p
    probes: dict[int, Probe] = {}
    for n in sorted(by_order, reverse=True):
        if len(ids) < n:
            continue
        grams, inside = _windows(ids, doc_starts, n)
        table = by_order[n]
        for s in np.flatnonzero(inside):
            p = table.get(grams[s].tobytes())
            target = int(s) + n - 1
            if p is not None and target not in probes:
                probes[target] = Probe("static", [target], p.text)
    return [probes[t] for t in sorted(probes)]


def identifier_spans(ids: np.ndarray, pieces: list[str]) -> list[tuple[int, int, str]]:
    """Maximal runs of tokens that spell one whole identifier: (start, end, name), end exclusive. A run
    starts with a token like ``foo`` or `` foo`` and continues with tokens of word characters only. A run
    glued to a word character outside it (``__init`` in ``__init__(``, where ``__(`` is one token) is
    only part of a name and is left out."""
    spans, start = [], None
    for t, i in enumerate(ids.tolist()):
        piece = pieces[i]
        if start is not None and WORD_PART.fullmatch(piece):
            continue
        if start is not None:
            spans.append((start, t))
            start = None
        if WORD_START.fullmatch(piece):
            start = t
    if start is not None:
        spans.append((start, len(ids)))
    out = []
    for a, b in spans:
        before = pieces[ids[a - 1]] if a > 0 else ""
        after = pieces[ids[b]] if b < len(ids) else ""
        glued = (before[-1:].isalnum() or before[-1:] == "_") and not pieces[ids[a]].startswith(" ")
        if not glued and not (after[:1].isalnum() or after[:1] == "_"):
            out.append((a, b, "".join(pieces[i] for i in ids[a:b].tolist()).lstrip(" ")))
    return out


def _is_definition(ids: np.ndarray, pieces: list[str], a: int, b: int) -> bool:
    before = pieces[ids[a - 1]].strip() if a > 0 else ""
    after = pieces[ids[b]] if b < len(ids) else ""
    return before in ("def", "class") or (after.strip() == "=" and after.startswith(" "))


def word_counts(ids: np.ndarray, pieces: list[str]) -> Counter:
    """How often each identifier occurs as a whole word in the decoded text of ``ids``."""
    return Counter(WORD.findall("".join(pieces[i] for i in ids.tolist())))


def in_context_probes(ids: np.ndarray, doc_starts: np.ndarray, pieces: list[str], train_counts: Counter,
                      max_train_count: int = 2, max_uses: int = 3) -> list[Probe]:
    """Later uses of identifiers defined earlier in the same document and seen at most
    ``max_train_count`` times in the train split; a use must span >= 2 tokens (its first token is the
    cue, the rest are targets). At most ``max_uses`` uses per definition."""
    probes = []
    bounds = list(doc_starts.tolist()) + [len(ids)]
    for d in range(len(bounds) - 1):
        lo, hi = bounds[d], bounds[d + 1]
        doc = ids[lo:hi]
        spans = identifier_spans(doc, pieces)
        defined: dict[str, int] = {}  # name -> end of its definition
        uses: Counter = Counter()
        for a, b, name in spans:
            if name in defined and b - a >= 2 and a >= defined[name] and uses[name] < max_uses:
                uses[name] += 1
                probes.append(Probe("in_context", list(range(lo + a + 1, lo + b)), name))
            elif name not in defined and train_counts[name] <= max_train_count and _is_definition(doc, pieces, a, b):
                defined[name] = b
    return probes


# -- scoring -----------------------------------------------------------------------------------------


@dataclass
class PositionScores:
    correct: np.ndarray  # (n,) bool: argmax at p-1 == ids[p]
    logprob: np.ndarray  # (n,) float: log p(ids[p] | context), nats
    scored: np.ndarray  # (n,) bool
    alpha: dict[int, np.ndarray] | None = None  # layer_id -> (n,) gate at p, mean over branches


@torch.no_grad()
def score_positions(model, ids: np.ndarray, doc_starts: np.ndarray, seq_len: int = 256, batch_size: int = 8,
                    needed: np.ndarray | None = None, gates: bool = False) -> PositionScores:
    """Score every position p >= 1 once: windows of ``seq_len`` at stride seq_len/2, position p scored
    in the first window where it has >= seq_len/2 tokens of context (or all before it). Windows carry
    the document-start mask, as in training (a transformers model, which takes none, reads across them). ``needed`` (n,) bool: skip windows that score none of them."""
    model.eval()
    device = next(model.parameters()).device
    ours = "boundary" in inspect.signature(model.forward).parameters  # else a transformers model: no document mask

    def logits_of(x, bd):
        return model(x, boundary=bd).logits if ours else model(input_ids=x).logits

    n = len(ids)
    T = min(seq_len, n)
    stride = max(1, T // 2)
    starts = list(range(0, n - T + 1, stride))
    if starts[-1] + T < n:
        starts.append(n - T)
    boundary = np.zeros(n, dtype=bool)
    boundary[doc_starts] = True
    jobs, done = [], 1
    for s in starts:
        lo, hi = done, s + T
        done = hi
        if hi > lo and (needed is None or needed[lo:hi].any()):
            jobs.append((s, lo, hi))
    out = PositionScores(np.zeros(n, bool), np.full(n, np.nan, np.float32), np.zeros(n, bool),
                         {lid: np.full(n, np.nan, np.float32) for lid in model.engram_layers} if gates else None)
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        x = torch.from_numpy(np.stack([ids[s:s + T] for s, _, _ in chunk])).to(device)  # (B, T)
        bd = torch.from_numpy(np.stack([boundary[s:s + T] for s, _, _ in chunk])).to(device)
        if gates:
            with capture_gates(model) as captured:
                logits = logits_of(x, bd)
            alpha = {lid: g[0].mean(dim=2).numpy() for lid, g in captured.items()}  # (B, T)
        else:
            logits = logits_of(x, bd)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for r, (s, lo, hi) in enumerate(chunk):
            pos = np.arange(lo, hi)
            tgt = torch.from_numpy(ids[lo:hi]).to(device)
            rows = logp[r, lo - 1 - s: hi - 1 - s]  # (hi-lo, V): predictions of lo..hi-1
            out.logprob[pos] = rows.gather(1, tgt[:, None])[:, 0].cpu().numpy()
            out.correct[pos] = (rows.argmax(dim=1) == tgt).cpu().numpy()
            out.scored[pos] = True
            if gates:
                for lid, a in alpha.items():
                    out.alpha[lid][pos] = a[r, lo - s: hi - s]
    return out


def retention_interval(with_: np.ndarray, without: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of mean(without) / mean(with) over paired target tokens (resampled
    together; tokens of one in-context probe are not independent, so it is a little optimistic)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(with_), (n_boot, len(with_)))
    w, wo = with_[idx].mean(axis=1), without[idx].mean(axis=1)
    ratios = wo[w > 0] / w[w > 0]
    return [round(float(q), 4) for q in np.percentile(ratios, [2.5, 97.5])] if len(ratios) else []


def _summary(targets: np.ndarray, with_: PositionScores, without: PositionScores, probes: int) -> dict:
    targets = targets[with_.scored[targets]] if len(targets) else targets
    if not len(targets):
        return {"probes": probes, "targets": 0}
    acc_w, acc_wo = float(with_.correct[targets].mean()), float(without.correct[targets].mean())
    res = {"probes": probes, "targets": int(len(targets)),
           "acc_with": round(acc_w, 4), "acc_without": round(acc_wo, 4),
           "retention": round(acc_wo / acc_w, 4) if acc_w > 0 else None,
           "retention_ci95": retention_interval(with_.correct[targets].astype(np.float64),
                                                without.correct[targets].astype(np.float64)),
           "logprob_with": round(float(with_.logprob[targets].mean()), 4),
           "logprob_without": round(float(without.logprob[targets].mean()), 4)}
    if with_.alpha:  # mean gate at the targets, and its standard error over them
        res["alpha"] = {str(lid + 1): round(float(np.nanmean(a[targets])), 4) for lid, a in with_.alpha.items()}
        res["alpha_sem"] = {str(lid + 1): round(float(np.nanstd(a[targets]) / np.sqrt(len(targets))), 4)
                            for lid, a in with_.alpha.items()}
    return res


def knockout_report(model, pieces: list[str], train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                    max_probes: int | None = None, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                    top_patterns: int = 300, min_count: int = 10, max_train_count: int = 2) -> dict:
    """Build both probe sets (patterns and identifier counts from ``train``, probes in ``val``, each a
    (ids, doc_starts) pair from ``read_split``), score them with and without Engram, and summarise.
    ``max_probes`` samples that many probes per set (seeded). "all" is every scored position (except
    document starts), a reference. alpha: mean gate at the targets (static: the pattern's last token)."""
    host = as_table_host(model, "knockout_report")
    if not host.engram_layers:
        raise ValueError("the model has no Engram layer: nothing to knock out")
    contributions = host.contributions()
    ours = all(contributions[lid] is layer for lid, layer in host.engram_layers.items())  # gates: our modules only
    patterns = mine_static_patterns(*train, pieces, top=top_patterns, min_count=min_count)
    val_ids, val_starts = val
    sets = {"static": static_probes(val_ids, val_starts, patterns),
            "in_context": in_context_probes(val_ids, val_starts, pieces, word_counts(train[0], pieces), max_train_count)}
    rng = np.random.default_rng(seed)
    for name, probes in sets.items():
        if max_probes is not None and len(probes) > max_probes:
            keep = np.sort(rng.choice(len(probes), max_probes, replace=False))
            sets[name] = [probes[k] for k in keep]
    targets = {name: np.array(sorted({t for p in probes for t in p.targets}), dtype=np.int64)
               for name, probes in sets.items()}
    needed = None
    if max_probes is not None:
        needed = np.zeros(len(val_ids), dtype=bool)
        for t in targets.values():
            needed[t] = True
    with_ = score_positions(model, val_ids, val_starts, seq_len, batch_size, needed, gates=ours)
    with knockout(model):
        without = score_positions(model, val_ids, val_starts, seq_len, batch_size, needed)
    not_start = np.ones(len(val_ids), dtype=bool)
    not_start[val_starts] = False
    everything = np.flatnonzero(with_.scored & not_start)
    return {
        "static": _summary(targets["static"], with_, without, len(sets["static"])),
        "in_context": _summary(targets["in_context"], with_, without, len(sets["in_context"])),
        "all": _summary(everything, with_, without, len(everything)),
        "patterns_mined": len(patterns),
        "top_patterns": [{"text": p.text, "tokens": len(p.ids), "train_count": p.count} for p in patterns[:25]],
        "static_examples": sorted(Counter(p.text for p in sets["static"]).items(), key=lambda kv: -kv[1])[:15],
        "in_context_examples": sorted(Counter(p.text for p in sets["in_context"]).items(), key=lambda kv: -kv[1])[:15],
        "val_tokens": int(len(val_ids)),
        "train_tokens": int(len(train[0])),
        "engram_layers": [lid + 1 for lid in host.engram_layers],
    }


def inspect_knockout(ckpt_path: str, out_dir=None, max_probes: int | None = None, max_train_tokens: int | None = None,
                     max_val_tokens: int | None = None, seq_len: int = 256, device: str = "cpu") -> dict:
    """Knock-out report of a checkpoint on its own corpus; writes knockout.json to ``out_dir`` if given."""
    from engram.train import load_checkpoint
    from engram.train.startup import checkpoint_data

    ckpt = load_checkpoint(ckpt_path, device=device)
    data = checkpoint_data(ckpt)
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step,
              **knockout_report(ckpt.model, vocab_pieces(ckpt.tokenizer), read_split(data.train, max_train_tokens),
                                read_split(data.val, max_val_tokens), max_probes, seq_len)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "knockout.json", result, indent=1)
    return result


def inspect_knockout_text(model, tokenizer_file, source: str, out_dir=None, max_probes: int | None = None,
                          max_train_tokens: int | None = None, max_val_tokens: int | None = None, seq_len: int = 256,
                          cache_dir: str = "runs/cache", val_fraction: float = 0.1, about: dict | None = None,
                          storage=None) -> dict:
    """Knock-out report of a model built elsewhere (a transformers Qwen4-Exp with its PLE layers, as
    ``engram inspect knockout --hf`` loads it) on ``source``, split into train (patterns mined) and validation
    (probes) documents as ``engram data prepare`` splits them (``val_fraction`` of them, by name), tokenized
    by ``tokenizer_file``. ``about`` is recorded with the result, and ``storage.stats()`` (a storage handle)
    after the run; writes knockout.json to ``out_dir`` if given."""
    from engram.data.bpe import load_tokenizer
    from engram.data.config import DataConfig
    from engram.data.prepare import prepare_with_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    config = DataConfig(source=source, tokenizer=str(tokenizer_file), cache_dir=str(cache_dir), val_fraction=val_fraction)
    data = prepare_with_tokenizer(config, tokenizer, tokenizer_file)
    result = {**(about or {}), "text": source,
              **knockout_report(model, vocab_pieces(tokenizer), read_split(data.train, max_train_tokens),
                                read_split(data.val, max_val_tokens), max_probes, seq_len)}
    if storage is not None:
        result["storage"] = storage_report(storage.stats())
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "knockout.json", result, indent=1)
    return result
