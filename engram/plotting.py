"""PNG output shared by the research tools (the demo, ``engram.analysis``, ``engram.sweeps``).

matplotlib is imported lazily, on the Agg backend, so importing a tool costs nothing and sweeps and CI
run on machines without a display. The library layer never draws.
"""

from __future__ import annotations

from pathlib import Path

DPI = 120


def pyplot():
    """matplotlib.pyplot on the Agg backend: sweeps and CI run on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = DPI, bbox_tight: bool = False) -> Path:
    """Write ``fig`` as a PNG (creating its directory) and close it. ``bbox_tight`` crops to what is
    drawn, for figures with a legend or labels outside the axes; otherwise the layout is tightened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not bbox_tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if bbox_tight else None)
    pyplot().close(fig)
    return path
