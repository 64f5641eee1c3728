"""LogitLens (docs/ALGORITHM.md §5): how early each block's residual stream already predicts the final distribution
(``engram inspect logit-lens``).

Legend: B batch, T time, D model width, V vocabulary, L blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from engram.analysis.hooks import capture_streams, head_logits, short_labels, val_windows
from engram.fileio import atomic_write_json
from engram.plotting import pyplot, save_figure


@torch.no_grad()
def logit_lens(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> list[float]:
    """Mean over tokens of KL(p_final || p_l) in nats, one value per block l = 1..L.

    p_l = softmax(head(stream after block l)); the last block's stream is what the head reads, so its
    KL is 0. Lower KL in early blocks means the prediction is finished sooner (docs/ALGORITHM.md §5).
    """
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(len(model.layers), dtype=torch.float64)
    count = 0
    with capture_streams(model) as streams:
        for ids, boundary in batches:
            ids = ids.to(device)
            final = F.log_softmax(model(ids, boundary=None if boundary is None else boundary.to(device))
                                  .logits.float(), dim=-1)  # (B, T, V)
            p_final = final.exp()
            for i, h in enumerate(streams):
                layer = F.log_softmax(head_logits(model, h).float(), dim=-1)  # (B, T, V)
                total[i] += (p_final * (final - layer)).sum().double().cpu()
            count += ids.numel()
    return (total / max(count, 1)).tolist()


def plot_logit_lens(curves: dict[str, list[float]], path, dashed: list[str] = ()) -> Path:
    """One line per model: mean KL(final || block l) against the block number; models named in
    ``dashed`` (the baselines) are drawn dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, kl in curves.items():
        ax.plot(range(1, len(kl) + 1), kl, marker="o", ls="--" if name in dashed else "-", label=name)
    ax.set_xlabel("block (1-based)")
    ax.set_ylabel("KL(final || block), nats")
    ax.set_title("LogitLens")
    ax.set_xticks(range(1, max(len(k) for k in curves.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def inspect_logit_lens(ckpts: list[str], out_dir, batch_size: int = 4, seq_len: int = 256, batches: int = 4,
                       device: str = "cpu") -> dict:
    """LogitLens for each checkpoint on its own validation windows; writes logit_lens.png/json."""
    from engram.train import load_checkpoint

    if not ckpts:
        raise ValueError("logit-lens needs at least one --ckpt")
    curves, info, engram = {}, {}, []
    for path, name in zip(ckpts, short_labels(ckpts)):
        ckpt = load_checkpoint(path, device=device)
        if ckpt.model.engram_layers:
            engram.append(name)
        windows = val_windows(ckpt, batch_size, seq_len, batches)
        kl = logit_lens(ckpt.model, windows)
        curves[name] = kl
        info[name] = {"checkpoint": str(ckpt.path), "step": ckpt.step, "tokens": sum(x.numel() for x, _ in windows),
                      "engram_layers": [lid + 1 for lid in ckpt.model.engram_layers], "kl": kl}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"models": info,
              "png": str(plot_logit_lens(curves, out / "logit_lens.png", dashed=[n for n in curves if n not in engram]))}
    atomic_write_json(out / "logit_lens.json", result, indent=1)
    return result
