"""Engram table statistics: how the hashed n-grams of real text use the tables
(``engram inspect tables``).

Per Engram layer, over a split's tokens: the row-usage distribution of every head (rank/frequency,
log-log, with a least-squares Zipf exponent), per-head collision rates (the fraction of distinct
n-grams that share their row with another distinct n-gram in that head), and the fraction colliding
in *all* heads of their order (the multi-head hash exists to make this small). Two controls, same
n-grams: a capacity-1 table (every n-gram in one row: collision 1) and a shuffled hash (a uniformly
random row per distinct n-gram, same prime sizes: what an ideal hash would give).

A functional check beside them: validation loss of the trained model when every head reads one
usage-weighted mean row (capacity 1 at inference), when rows are permuted within each head (the
table's content no longer matches its n-grams), and when Engram is knocked out.

Legend: n tokens, m distinct n-grams, H heads (K per order), N max order, p a head's prime.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram.analysis.hooks import knockout, storage_report, windows_of
from engram.fileio import atomic_write_json
from engram.hashing import shift_back
from engram.plotting import pyplot, save_figure


@dataclass
class ZipfFit:
    exponent: float  # s in count ~ C * rank^-s
    intercept: float  # log C
    ranks: int  # ranks used by the fit


def fit_zipf(counts: np.ndarray, min_count: int = 3) -> ZipfFit:
    """Least squares of log(count) on log(rank) over the ranks whose count >= ``min_count`` (the flat
    tail of counts 1-2 is a sampling floor, not part of the power law)."""
    c = np.sort(np.asarray(counts, dtype=np.float64)[np.asarray(counts) > 0])[::-1]
    c = c[c >= min_count]
    if len(c) < 3:
        return ZipfFit(math.nan, math.nan, int(len(c)))
    r = np.arange(1, len(c) + 1, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(r), np.log(c), 1)
    return ZipfFit(float(-slope), float(intercept), int(len(c)))


def shared_rows(rows: np.ndarray) -> np.ndarray:
    """rows (m,): the row of each of m distinct n-grams -> (m,) bool, True where another n-gram has it too."""
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] >= 2


def collision_stats(rows: np.ndarray) -> dict:
    """rows (m, K): each distinct n-gram's row in the K heads of its order -> per-head collision rates,
    the fraction of n-grams colliding in every head (each head may share with a different n-gram), and
    the fraction that share *all* K rows with one other n-gram (``same_rows``: the table cannot tell
    them apart at all)."""
    shared = np.stack([shared_rows(rows[:, k]) for k in range(rows.shape[1])], axis=1)  # (m, K)
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return {"per_head": [round(float(x), 5) for x in shared.mean(axis=0)],
            "all_heads": round(float(shared.all(axis=1).mean()), 6),
            "same_rows": round(float((counts[inverse.reshape(-1)] >= 2).mean()), 6)}


def expected_random_collision(m: int, p: int) -> float:
    """P(a given n-gram shares its row with one of m-1 others) under a uniformly random hash into p rows."""
    return 1.0 - (1.0 - 1.0 / p) ** (m - 1)


def ngram_tuples(hasher, input_ids: torch.Tensor, boundary: torch.Tensor | None) -> torch.Tensor:
    """(B, T) raw ids -> (B, T, N) compressed ids [x'_t, x'_{t-1}, ...], pad before a document start (and,
    for V4.1, at and across barriers): exactly what the hash of order n reads in its first n columns."""
    compressed, doc = hasher.segments(input_ids, boundary)
    return torch.stack([shift_back(compressed, k, hasher.compressed_pad_id, doc)
                        for k in range(hasher.config.max_ngram_size)], dim=-1)


@torch.no_grad()
def collect_hashes(model, batches) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Every token's hash ids per Engram layer {layer_id: (n, H)} and its n-gram tuple (n, N)."""
    hashes: dict[int, list] = {lid: [] for lid in model.engram_layers}
    keys = []
    device = next(model.parameters()).device
    for ids, boundary in batches:
        ids, boundary = ids.to(device), None if boundary is None else boundary.to(device)
        for lid, h in model.hash(ids, boundary).items():
            if lid in hashes:
                hashes[lid].append(h.reshape(-1, h.shape[-1]).cpu().numpy())
        keys.append(ngram_tuples(model.hasher, ids, boundary).reshape(-1, model.hasher.config.max_ngram_size).cpu().numpy())
    return {lid: np.concatenate(v) for lid, v in hashes.items()}, np.concatenate(keys)


def table_statistics(model, batches, seed: int = 0, min_count: int = 3) -> dict:
    """Row usage, Zipf fits and collisions of every Engram layer and order, with both controls.

    Returns {"tokens": n, "layers": {block (1-based): {order: {...}}}} and, under "_usage", the per-head
    row counts for plotting (not JSON)."""
    if model.hasher is None:
        raise ValueError("the model has no Engram layer: no tables to analyse")
    hashes, keys = collect_hashes(model, batches)
    K = model.hasher.config.n_head_per_ngram
    rng = np.random.default_rng(seed)
    result, usage = {"tokens": int(len(keys)), "layers": {}}, {}
    for lid, h in hashes.items():
        layer, usage[lid] = {}, {}
        for o, primes in enumerate(model.hasher.primes[lid]):
            n = o + 2
            _, first, ngram_counts = np.unique(keys[:, :n], axis=0, return_index=True, return_counts=True)
            m = len(first)
            rows = h[first][:, o * K:(o + 1) * K]  # (m, K): a row is a function of the n-gram
            shuffled = np.stack([rng.integers(0, p, m) for p in primes], axis=1)
            heads = []
            for k, p in enumerate(primes):
                counts = np.bincount(h[:, o * K + k], minlength=p)
                usage[lid][(n, k)] = counts
                fit = fit_zipf(counts, min_count)
                heads.append({"rows": p, "rows_used": int((counts > 0).sum()),
                              "zipf_exponent": round(fit.exponent, 4), "zipf_ranks": fit.ranks})
            usage[lid][(n, "ngrams")] = ngram_counts
            layer[str(n)] = {
                "distinct_ngrams": int(m),
                "ngram_zipf_exponent": round(fit_zipf(ngram_counts, min_count).exponent, 4),
                "heads": heads,
                "collision": collision_stats(rows),
                "shuffled_hash": collision_stats(shuffled),
                "capacity_1": collision_stats(np.zeros((m, K), dtype=np.int64)),
                "expected_random": [round(expected_random_collision(m, p), 5) for p in primes],
                "expected_random_all_heads": round(float(np.prod([expected_random_collision(m, p) for p in primes])), 8),
            }
        result["layers"][str(lid + 1)] = layer
    result["_usage"] = usage
    return result


# -- functional controls ------------------------------------------------------------------------------


@contextlib.contextmanager
def table_control(model, kind: str, mean_rows: dict[int, torch.Tensor] | None = None, seed: int = 0):
    """Replace what every Engram table returns, while open: ``capacity_1`` reads ``mean_rows[layer]``
    (H, d_h) for every n-gram; ``shuffled`` permutes the rows within each head (collisions unchanged,
    content mismatched). Hooks on the table module; removed on exit."""
    handles = []
    gen = torch.Generator().manual_seed(seed)
    for lid, layer in model.engram_layers.items():
        emb = layer.embedding
        if kind == "capacity_1":
            row = mean_rows[lid]
            handles.append(emb.register_forward_hook(
                lambda mod, args, out, row=row: row.to(out.dtype).expand_as(out).clone()))
        elif kind == "shuffled":
            geometry = model.hasher.geometry[lid]
            perm = torch.cat([off + torch.randperm(p, generator=gen) for off, p in
                              zip(geometry.offsets, geometry.sizes)]).to(emb.offsets.device)  # (sum p,)
            handles.append(emb.register_forward_pre_hook(
                lambda mod, args, perm=perm: (perm[args[0] + mod.offsets] - mod.offsets,)))
        else:
            raise ValueError(f"unknown table control {kind!r}; known: capacity_1, shuffled")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def table_control_losses(model, batches, seed: int = 0) -> dict[str, float]:
    """Mean validation loss (nats) as trained, with capacity-1 tables (each head's mean row over these
    tokens), with rows shuffled within each head, and with Engram knocked out."""
    from engram.train.evaluation import mean_loss

    model.eval()
    device = next(model.parameters()).device
    batches = [(ids.to(device), None if b is None else b.to(device)) for ids, b in batches]
    sums = {lid: 0.0 for lid in model.engram_layers}
    count = 0
    for ids, boundary in batches:
        for lid, h in model.hash(ids, boundary).items():
            if lid in sums:
                sums[lid] = sums[lid] + model.engram_layers[lid].embedding(h).float().sum(dim=(0, 1))  # (H, d_h)
        count += ids.numel()
    mean_rows = {lid: s / count for lid, s in sums.items()}

    def loss() -> float:
        return round(mean_loss(model, batches, device)[0], 5)

    out = {"trained": loss()}
    for kind in ("capacity_1", "shuffled"):
        with table_control(model, kind, mean_rows, seed):
            out[kind] = loss()
    with knockout(model):
        out["knockout"] = loss()
    return out


# -- plot and entry point -------------------------------------------------------------------------------


def plot_row_usage(usage: dict, path, min_count: int = 3) -> Path:
    """Rank/frequency (log-log) per layer and order: each head's row counts, the distinct n-grams'
    counts (dashed), and head 0's Zipf fit."""
    plt = pyplot()
    panels = [(lid, n) for lid, u in usage.items() for n in sorted({key[0] for key in u})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (lid, n) in zip(axes[0], panels):
        u = usage[lid]
        heads = sorted(k for (o, k) in u if o == n and k != "ngrams")
        for k in heads:
            c = np.sort(u[(n, k)][u[(n, k)] > 0])[::-1]
            ax.loglog(np.arange(1, len(c) + 1), c, lw=1, alpha=0.8, label=f"head {k} rows")
        g = np.sort(u[(n, "ngrams")])[::-1]
        ax.loglog(np.arange(1, len(g) + 1), g, "k--", lw=1, label="distinct n-grams")
        fit = fit_zipf(u[(n, heads[0])], min_count)
        if fit.ranks:
            r = np.arange(1, fit.ranks + 1)
            ax.loglog(r, np.exp(fit.intercept) * r ** -fit.exponent, color="red", lw=1.5,
                      label=f"Zipf fit, s = {fit.exponent:.2f}")
        ax.set_title(f"block {lid + 1}, {n}-grams")
        ax.set_xlabel("rank")
        ax.set_ylabel("tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def inspect_release_tables(directory, source: str, out_dir, batch_size: int = 4, seq_len: int = 256,
                           batches: int = 16, cache_dir: str = "runs/cache", cache_rows: int = 0) -> dict:
    """Table statistics of a DeepSeek-V4.1 release (``engram.compat.deepseek.open_v41``: tables read from the
    shards in place) over ``batches`` windows of ``source`` (a file, directory or "hf:NAME") tokenized by
    the release's tokenizer; no model, so no loss controls. Writes tables.json and row_usage.png. Layers are
    keyed by 1-based block, as in every report here (the release's ``layers.1.engram`` is block "2")."""
    from engram.compat.deepseek import open_v41
    from engram.data import prepare_text

    tokenizer_file = Path(directory) / "tokenizer.json"
    with open_v41(directory, cache_rows=cache_rows) as release:
        shards = prepare_text(source, release.tokenizer, tokenizer_file, cache_dir)
        windows = list(shards.eval_batches(batch_size, seq_len, batches))
        if not windows:
            raise ValueError(f"{source} holds no window of {seq_len} tokens; use a shorter --seq-len")
        stats = table_statistics(release, windows)
        tiers = storage_report(release.stats())
    usage = stats.pop("_usage")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"release": str(directory), "text": source, **stats, "storage": tiers,
              "png": str(plot_row_usage(usage, out / "row_usage.png"))}
    atomic_write_json(out / "tables.json", result, indent=1)
    return result


def inspect_tables(ckpt_path: str, out_dir, split: str = "val", batch_size: int = 4, seq_len: int = 256,
                   batches: int = 16, device: str = "cpu") -> dict:
    """Table statistics of a checkpoint over ``batches`` fixed windows of a split, plus the functional
    controls on the validation windows; writes tables.json and row_usage.png to ``out_dir``."""
    from engram.train import load_checkpoint
    from engram.train.startup import checkpoint_data

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    ckpt = load_checkpoint(ckpt_path, device=device)
    data = checkpoint_data(ckpt)
    windows = windows_of(ckpt, getattr(data, split), batch_size, seq_len, batches)
    stats = table_statistics(ckpt.model, windows)
    usage = stats.pop("_usage")
    val = windows if split == "val" else windows_of(ckpt, data.val, batch_size, seq_len, batches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt.path), "split": split, **stats,
              "losses": table_control_losses(ckpt.model, val),
              "png": str(plot_row_usage(usage, out / "row_usage.png"))}
    atomic_write_json(out / "tables.json", result, indent=1)
    return result
