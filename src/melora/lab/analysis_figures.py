"""Figures of ``melora analyze``: the spectra of the given adapters side by side, and the effective rank per
layer. They take ``melora.analysis.analyze_adapter`` results (JSON-able dicts) and import matplotlib only
when drawing, so a caller can tell a missing matplotlib (``ModuleNotFoundError``) from other failures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melora.lab.study.figures import label_panel, save, task_panels

SPECTRA_FILE = "spectra.png"
EFFECTIVE_RANK_FILE = "effective_rank.png"


def _label(result: dict[str, Any]) -> str:
    """``<folder name> (<method>)``: the adapter's folder, or its run folder's for ``.../run/adapter``."""
    folder = Path(result["adapter"]).resolve()
    if folder.name == "adapter":
        folder = folder.parent
    return f"{folder.name} ({result['method']})"


def _normalised_spectra(result: dict[str, Any]) -> list[list[float]]:
    """Each module's singular values divided by its largest; zeros (invisible on a log axis) left out."""
    spectra = []
    for module in result["modules"]:
        values = module["singular_values"]
        top = values[0] if values else 0.0
        spectra.append([v / top for v in values if v > 0] if top > 0 else [])
    return spectra


def spectra_figure(results: list[dict[str, Any]], path: Path) -> Path:
    """One panel per adapter: s_k / s_1 against k, one faint line per module and their mean in bold (log y)."""
    fig, axes = task_panels(len(results))
    for ax, result in zip(axes, results):
        spectra = [s for s in _normalised_spectra(result) if s]
        for values in spectra:
            ax.plot(range(1, len(values) + 1), values, color="C0", alpha=0.15, linewidth=0.8)
        longest = max((len(s) for s in spectra), default=0)
        mean = [
            sum(s[k] for s in spectra if len(s) > k) / sum(1 for s in spectra if len(s) > k)
            for k in range(longest)
        ]
        if mean:
            ax.plot(range(1, longest + 1), mean, color="C0", linewidth=2.2, label="mean over modules")
        ax.set_yscale("log")
        ax.set_ylabel("singular value / largest")
        label_panel(ax, _label(result), "k (largest first)")
    low = min(ax.get_ylim()[0] for ax in axes)
    for ax in axes:  # one scale for every panel: the spectra are compared side by side
        ax.set_ylim(low, 1.5)
    save(fig, path)
    return path


def effective_rank_figure(results: list[dict[str, Any]], path: Path) -> Path:
    """Mean entropy effective rank per layer, one line per adapter (modules in order where names hold no layer)."""
    fig, axes = task_panels(1)
    ax = axes[0]
    by_layer = all(result["layers"] for result in results)
    for result in results:
        if by_layer:
            xs = [layer["layer"] for layer in result["layers"]]
            ys = [layer["mean_entropy_effective_rank"] for layer in result["layers"]]
        else:
            xs = list(range(len(result["modules"])))
            ys = [module["entropy_effective_rank"] for module in result["modules"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=_label(result))
    ax.set_ylabel("entropy effective rank")
    ax.xaxis.get_major_locator().set_params(integer=True)  # layer / module indices
    label_panel(ax, "effective rank of dW", "layer" if by_layer else "module (in order)")
    save(fig, path)
    return path


def write_figures(results: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Both figures as PNG files in ``folder``; raises ModuleNotFoundError without matplotlib."""
    return [
        spectra_figure(results, folder / SPECTRA_FILE),
        effective_rank_figure(results, folder / EFFECTIVE_RANK_FILE),
    ]
