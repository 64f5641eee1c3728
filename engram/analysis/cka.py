"""Linear CKA between the blocks of a baseline and an Engram model, and the soft alignment index
(docs/ALGORITHM.md §5; ``engram inspect cka``).

Legend: B batch, T time, D model width, L blocks, n tokens in a CKA minibatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from engram.analysis.hooks import capture_streams, short_labels, val_windows
from engram.fileio import atomic_write_json
from engram.plotting import pyplot, save_figure


def _hsic_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pieces of the unbiased HSIC for linear kernels of stacked features x (L, n, d):
    the Gram matrices with zeroed diagonals flattened (L, n*n), their row sums (L, n) and totals (L,)."""
    K = x @ x.transpose(1, 2)  # (L, n, n)
    K.diagonal(dim1=1, dim2=2).zero_()
    rows = K.sum(dim=2)  # (L, n)
    return K.reshape(K.shape[0], -1), rows, rows.sum(dim=1)


def hsic1_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) between every pair of representations, linear kernels.

    x (La, n, da), y (Lb, n, db), the same n tokens in both, n >= 4. Returns (La, Lb):
    HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    K~ the Gram matrix with its diagonal zeroed. Computed in float64.
    """
    n = x.shape[1]
    if n < 4 or y.shape[1] != n:
        raise ValueError(f"HSIC_1 needs the same n >= 4 tokens in both representations, got {x.shape[1]}, {y.shape[1]}")
    kx, rx, sx = _hsic_terms(x.double())
    ky, ry, sy = _hsic_terms(y.double())
    trace = kx @ ky.T  # (La, Lb): tr(K~L~) = sum(K~ * L~), both symmetric
    return (trace + sx[:, None] * sy[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx @ ry.T)) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA between every layer of two models, accumulated over minibatches of tokens
    (Nguyen et al. 2021): CKA = mean_k HSIC_1(K_k, L_k) / sqrt(mean_k HSIC_1(K_k, K_k) mean_k HSIC_1(L_k, L_k)).

    The unbiased HSIC makes CKA of independent representations ~0 even for small minibatches; it is
    invariant to orthogonal transforms and isotropic scaling of either side. ``update`` takes stacked
    layers (La, n, da) and (Lb, n, db) for the same n tokens.
    """

    def __init__(self):
        self.xy = self.xx = self.yy = None
        self.batches = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xy = hsic1_matrix(x, y)
        xx = torch.diagonal(hsic1_matrix(x, x))  # only the self terms are needed
        yy = torch.diagonal(hsic1_matrix(y, y))
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
        else:
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """(La, Lb) CKA matrix."""
        if self.xy is None:
            raise ValueError("no minibatch was added")
        return self.xy / torch.sqrt(self.xx[:, None].clamp_min(1e-300) * self.yy[None, :].clamp_min(1e-300))


def linear_cka(x: torch.Tensor, y: torch.Tensor, minibatch: int | None = None) -> float:
    """Linear CKA of two representations (n, dx), (n, dy) of the same n tokens, with the unbiased
    HSIC, over consecutive minibatches of ``minibatch`` tokens (default: all n at once)."""
    size = minibatch or x.shape[0]
    cka = MinibatchCKA()
    for s in range(0, x.shape[0] - size + 1, size):
        cka.update(x[None, s:s + size], y[None, s:s + size])
    return float(cka.compute()[0, 0])


@torch.no_grad()
def cka_between(base, engram, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], minibatch: int = 512,
                seed: int = 0) -> np.ndarray:
    """S[i, j] = CKA(base block i+1, engram block j+1) on the same tokens.

    Each batch's tokens (position 0 of every window excluded: it has no context, and its outlier norm
    would dominate a linear kernel) are shuffled with a fixed seed and cut into minibatches of
    ``minibatch`` tokens; a leftover shorter than a minibatch is dropped.
    """
    base.eval()
    engram.eval()
    device = next(base.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    cka = MinibatchCKA()
    with capture_streams(base) as sa, capture_streams(engram) as sb:
        for ids, boundary in batches:
            ids = ids.to(device)
            boundary = None if boundary is None else boundary.to(device)
            base(ids, boundary=boundary)
            engram(ids, boundary=boundary)
            xa = torch.stack([h[:, 1:].reshape(-1, h.shape[-1]) for h in sa])  # (La, B*(T-1), D)
            xb = torch.stack([h[:, 1:].reshape(-1, h.shape[-1]) for h in sb])  # (Lb, B*(T-1), D)
            order = torch.randperm(xa.shape[1], generator=gen).to(device)
            for s in range(0, len(order) - minibatch + 1, minibatch):
                idx = order[s:s + minibatch]
                cka.update(xa[:, idx], xb[:, idx])
    if not cka.batches:
        raise ValueError(f"no batch holds a minibatch of {minibatch} tokens (position 0 of each window is "
                         "left out): lower the minibatch or use larger batches")
    return cka.compute().cpu().numpy()


def alignment_index(S: np.ndarray, top: int = 5) -> np.ndarray:
    """Soft alignment index (docs/ALGORITHM.md §5): a_j = sum_{i in I_j} S_ij * i / sum_{i in I_j} S_ij, with I_j the
    ``top`` rows (baseline layers, 1-based i) most similar to column j (Engram layer j); all rows when
    there are fewer. a_j > j: Engram's layer j does the work of a deeper baseline layer."""
    S = np.asarray(S, dtype=np.float64)
    k = min(top, S.shape[0])
    out = np.empty(S.shape[1])
    for j in range(S.shape[1]):
        rows = np.argsort(-S[:, j], kind="stable")[:k]
        w = S[rows, j]
        out[j] = float((w * (rows + 1)).sum() / w.sum())
    return out


def plot_cka(S: np.ndarray, path, base_name: str = "baseline", engram_name: str = "engram",
             align: np.ndarray | None = None, reference: np.ndarray | None = None) -> Path:
    """Heatmap of S (rows: baseline blocks, columns: Engram blocks) on its own colour range, each
    column's best match boxed, a_j drawn over it (and the baseline-vs-itself a_j, dotted)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    lo, hi = float(np.nanmin(S)), float(np.nanmax(S))
    im = ax.imshow(S, origin="lower", cmap="magma", vmin=lo, vmax=hi,
                   extent=(0.5, S.shape[1] + 0.5, 0.5, S.shape[0] + 0.5))
    best = S.argmax(axis=0)
    for i in range(S.shape[0]):
        for j in range(S.shape[1]):
            ax.text(j + 1, i + 1, f"{S[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if S[i, j] > (lo + hi) / 2 else "white")
    for j, i in enumerate(best):
        ax.add_patch(plt.Rectangle((j + 0.55, i + 0.55), 0.9, 0.9, fill=False, ec="cyan", lw=1.5))
    n = max(S.shape)
    ax.plot([0.5, n + 0.5], [0.5, n + 0.5], color="white", ls=":", lw=0.8)
    if align is not None:
        ax.plot(range(1, S.shape[1] + 1), align, color="cyan", marker="x", label="$a_j$")
    if reference is not None:
        ax.plot(range(1, S.shape[1] + 1), reference, color="lightgreen", ls="--", marker=".",
                label=f"$a_j$, {base_name} vs itself")
    if align is not None or reference is not None:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    ax.set_xlabel(f"{engram_name} block j")
    ax.set_ylabel(f"{base_name} block i")
    ax.set_title("linear CKA (minibatch, unbiased); boxes: best match", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path, bbox_tight=True)  # the legend sits below the axes


def inspect_cka(base: str, engram: str, out_dir, batch_size: int = 4, seq_len: int = 256, batches: int = 8,
                minibatch: int = 512, top: int = 5, device: str = "cpu") -> dict:
    """CKA between the blocks of a baseline and an Engram checkpoint on the baseline's validation
    windows (both must use the same tokenizer); writes cka.png/json with the alignment index a_j, the
    same index of the baseline against itself (the reference a_j is read against) and each Engram
    block's most similar baseline block. The even and odd batches are also scored apart, so a reader
    can see whether a best match survives a change of data (split-half stability)."""
    from engram.train import load_checkpoint

    a = load_checkpoint(base, device=device)
    b = load_checkpoint(engram, device=device)
    if a.tokenizer.to_str() != b.tokenizer.to_str():
        raise ValueError(f"{base} and {engram} use different tokenizers; CKA needs the same tokens in both")
    windows = val_windows(a, batch_size, seq_len, batches)
    S = cka_between(a.model, b.model, windows, minibatch)
    align = alignment_index(S, top)
    halves = [cka_between(a.model, b.model, windows[k::2], minibatch) for k in (0, 1)] if len(windows) > 1 else []
    # the index of the baseline against itself: a_j is pulled toward the middle block when I_j holds most
    # blocks (top 5 of 6), so a_j means something only next to this reference
    reference = alignment_index(cka_between(a.model, a.model, windows, minibatch), top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_cka(S, out / "cka.png", *short_labels([base, engram]), align, reference)
    # tokens scored: each batch's B*(T-1) positions in whole minibatches (cka_between drops the rest)
    scored = sum(x.shape[0] * (x.shape[1] - 1) // minibatch * minibatch for x, _ in windows)
    result = {"base": str(a.path), "engram": str(b.path), "tokens": scored,
              "minibatch": minibatch, "cka": np.round(S, 4).tolist(), "top": top,
              "alignment_index": np.round(align, 3).tolist(),
              "alignment_index_base_vs_itself": np.round(reference, 3).tolist(),
              "best_match": (S.argmax(axis=0) + 1).tolist(),
              "best_match_halves": [(h.argmax(axis=0) + 1).tolist() for h in halves],
              "alignment_index_halves": [np.round(alignment_index(h, top), 3).tolist() for h in halves],
              "engram_layers": [lid + 1 for lid in b.model.engram_layers], "png": str(png)}
    atomic_write_json(out / "cka.json", result, indent=1)
    return result
