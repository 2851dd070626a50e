"""Figures the stages write next to their outputs (PNG, headless)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["figure"]


@contextlib.contextmanager
def figure(path: str, title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (6, 3.5)) -> Iterator[Any]:
    """Yield a matplotlib Axes; on exit add the legend (if any labels) and save the figure to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7 if len(ax.get_legend_handles_labels()[1]) > 3 else None)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
