"""Figures for the evaluation scripts: matplotlib (the ``eval`` extra) without a screen."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
