"""Gate maps (docs/ALGORITHM.md §5: "the gate is high on the last token of multi-token entities and set phrases");
``engram inspect gates``.

For one text: alpha of every Engram layer and branch at every token, as an HTML page (one span per
token, background by alpha, values in the tooltip), a PNG heatmap, and the highest-gated n-grams
(the token with its one or two predecessors, the n-grams the gate actually looked up).

Legend: T tokens, G branches.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram.analysis.hooks import capture_gates
from engram.data.bpe import special_ids, with_bos
from engram.fileio import atomic_write_json, atomic_write_text
from engram.plotting import pyplot, save_figure


@dataclass
class GateMap:
    """``pieces[t]`` is token t's text (``ids[t]`` its id); ``gates[layer_id]`` is (T, G) alpha.
    ``starts[t]`` is True where a document starts (the BOS), where n-grams reset."""

    ids: list[int]
    pieces: list[str]
    gates: dict[int, np.ndarray]
    starts: list[bool]

    def rows(self) -> list[tuple[str, np.ndarray]]:
        """(label, (T,) alpha) for every layer and branch; layers 1-based like the paper."""
        return [(f"block {lid + 1} branch {g}", a[:, g]) for lid, a in self.gates.items() for g in range(a.shape[1])]

    def ngram(self, t: int, n: int = 3) -> str:
        """The text of token t and up to n-1 predecessors, stopping at a document start."""
        first = t
        while first > t - n + 1 and first > 0 and not self.starts[first]:
            first -= 1
        return "".join(self.pieces[first:t + 1])


def _pieces(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """Each token's text from its character offsets (a byte-level token that splits a character has
    the character's offsets twice: the later one gets an empty piece)."""
    pieces, end = [], 0
    for a, b in offsets:
        a = max(a, end)
        pieces.append(text[a:b] if b > a else "")
        end = max(end, b)
    return pieces


@torch.no_grad()
def gate_map(model, tokenizer, text: str, bos: bool = True, max_tokens: int | None = None) -> GateMap:
    """alpha at every token of ``text`` (a ``tokenizers.Tokenizer``), preceded by the BOS like the
    training documents when the tokenizer has one and ``bos``. ``max_tokens`` keeps only the first
    tokens (the BOS included); without it a text longer than the model's context is refused."""
    if not model.engram_layers:
        raise ValueError("the model has no Engram layer: no gates to map")
    enc = tokenizer.encode(text)
    ids, pieces = list(enc.ids), _pieces(text, enc.offsets)
    bos_id = special_ids(tokenizer).bos if bos else None  # the BOS prepare_data put before each document
    ids = with_bos(ids, bos_id)  # as engram.data.prompt_ids encodes a prompt
    if bos_id is not None:
        pieces = [tokenizer.id_to_token(bos_id)] + pieces
    if max_tokens is not None:
        ids, pieces = ids[:max_tokens], pieces[:max_tokens]
    if not ids:
        raise ValueError("the text has no tokens")
    max_len = model.config.backbone.max_seq_len
    if len(ids) > max_len:
        raise ValueError(f"the text has {len(ids)} tokens; the model reads at most {max_len} "
                         "(use a shorter text or --max-tokens)")
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    starts = [bos_id is not None and t == 0 for t in range(len(ids))]
    with capture_gates(model) as gates:
        model(x, boundary=torch.tensor([starts], device=device) if bos_id is not None else None)
    return GateMap(ids=ids, pieces=pieces, gates={lid: g[0][0].numpy() for lid, g in gates.items()},
                   starts=starts)


def top_ngrams(gm: GateMap, k: int = 20, n: int = 3) -> list[dict]:
    """The k positions with the highest alpha (mean over layers and branches), as the n-gram that
    ends there; a repeated n-gram is listed once, at its highest alpha. The BOS is skipped."""
    alpha = np.mean([a.mean(axis=1) for a in gm.gates.values()], axis=0)  # (T,)
    seen, out = set(), []
    for t in np.argsort(-alpha, kind="stable"):
        if gm.starts[t]:
            continue
        text = gm.ngram(int(t), n)
        if text in seen:
            continue
        seen.add(text)
        out.append({"position": int(t), "ngram": text, "token": gm.pieces[t], "alpha": round(float(alpha[t]), 4)})
        if len(out) == k:
            break
    return out


def _colour(a: float) -> str:
    """White (alpha 0) to saturated orange (alpha 1)."""
    a = min(max(float(a), 0.0), 1.0)
    return f"rgb(255,{int(255 - 120 * a)},{int(255 - 255 * a)})"


def gate_map_html(gm: GateMap, title: str = "Engram gate map", top: list[dict] | None = None) -> str:
    """A standalone HTML page: per layer and branch a paragraph with one ``<span class="tok">`` per token,
    coloured by alpha, tooltip with every layer's values. All text is escaped."""
    rows = gm.rows()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:1.5em} .map{font-family:monospace;white-space:pre-wrap;"
        "line-height:1.7;border:1px solid #ccc;padding:.6em} .tok{border-radius:2px} .bos{color:#888}"
        " td,th{padding:2px 8px;text-align:left;font-family:monospace}",
        "</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>Background: gate &alpha; (white 0 &rarr; orange 1). Hover a token for its values.</p>",
    ]
    tips = []
    for t in range(len(gm.ids)):
        values = ", ".join(f"{label}: {alpha[t]:.3f}" for label, alpha in rows)
        tips.append(html.escape(f"#{t} id {gm.ids[t]} {gm.ngram(t)!r} | {values}", quote=True))
    for label, alpha in rows:
        parts.append(f"<h3>{html.escape(label)} (mean &alpha; {float(np.mean(alpha)):.3f})</h3>")
        # spans joined with nothing between them: the map is white-space: pre-wrap, so any separator would show
        spans = "".join(f"<span class='{'tok bos' if gm.starts[t] else 'tok'}' style='background:{_colour(alpha[t])}' "
                        f"title='{tips[t]}'>{html.escape(piece)}</span>" for t, piece in enumerate(gm.pieces))
        parts.append(f"<div class='map'>{spans}</div>")
    if top:
        parts.append("<h3>Highest-gated n-grams (mean over layers and branches)</h3><table>"
                     "<tr><th>&alpha;</th><th>n-gram</th><th>position</th></tr>")
        for row in top:
            parts.append(f"<tr><td>{row['alpha']:.3f}</td><td>{html.escape(repr(row['ngram']))}</td>"
                         f"<td>{row['position']}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plot_gate_map(gm: GateMap, path, per_line: int = 48, max_tokens: int = 192) -> Path:
    """Heatmap PNG: the first ``max_tokens`` tokens in lines of ``per_line``, one row per layer and branch."""
    plt = pyplot()
    rows = gm.rows()
    T = min(len(gm.ids), max_tokens)
    lines = max(1, -(-T // per_line))
    # each line: 0.3 inch per heatmap row, plus room below it for the rotated token labels
    heights = [0.3 * len(rows) + 0.8] * lines
    fig, axes = plt.subplots(lines, 1, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"hspace": 1.6 / (0.3 * len(rows))})
    for k, ax in enumerate(axes[:, 0]):
        a, b = k * per_line, min(T, (k + 1) * per_line)
        grid = np.full((len(rows), per_line), np.nan)
        for r, (_, alpha) in enumerate(rows):
            grid[r, : b - a] = alpha[a:b]
        im = ax.imshow(grid, aspect="auto", cmap="Oranges", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(b - a))
        ax.set_xticklabels([repr(p)[1:-1].replace(" ", "·")[:9] for p in gm.pieces[a:b]], rotation=90, fontsize=7,
                           fontfamily="monospace")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    axes[0, 0].set_title(f"Engram gate alpha per token (first {T} of {len(gm.ids)} tokens)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    return save_figure(fig, path, dpi=110, bbox_tight=True)


def inspect_gates(ckpt_path: str, text: str, out_dir, top: int = 20, max_tokens: int | None = None,
                  device: str = "cpu") -> dict:
    """Gate map of ``text`` under a checkpoint: writes gates.html, gates.png and gates.json to ``out_dir``."""
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, device=device)
    gm = gate_map(ckpt.model, ckpt.tokenizer, text, max_tokens=max_tokens)
    best = top_ngrams(gm, top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gates.html", gate_map_html(gm, f"Engram gate map: {ckpt.path}", best))
    png = plot_gate_map(gm, out / "gates.png")
    result = {"checkpoint": str(ckpt.path), "tokens": len(gm.ids),
              "mean_alpha": {label: round(float(np.mean(a[1:] if gm.starts[0] else a)), 4) for label, a in gm.rows()},
              "top_ngrams": best, "html": str(out / "gates.html"), "png": str(png)}
    atomic_write_json(out / "gates.json", {**result, "pieces": gm.pieces,
                                           "alpha": {label: np.round(a, 4).tolist() for label, a in gm.rows()}},
                      indent=1)
    return result
