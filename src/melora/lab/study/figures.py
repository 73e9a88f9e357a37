"""One row of panels, one per task, as every study figure draws them; saved as PNG."""

from __future__ import annotations

from pathlib import Path


def task_panels(count: int):
    """``(figure, axes)``: ``count`` panels side by side (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    return fig, list(axes[0])


def label_panel(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def save(fig, path: Path | None) -> None:
    """Write ``fig`` to ``path`` (none: discard it) and free it."""
    import matplotlib.pyplot as plt

    if path is not None:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)
