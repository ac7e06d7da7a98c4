"""`ditrt quality --plot`: the speed/quality frontier of a quality report, as a PNG.

One panel per (cost, metric) pair: the Fréchet distance and the accuracy of each configuration
against images/s, and against block evaluations when the report's rows carry `block_evaluations`
(caching). Every point is labelled with its configuration's name. matplotlib is imported here
only, lazily (the `quality` extra), with the Agg backend: no display is needed.
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError
from ..core.files import atomic_output

METRICS = (("frechet_distance", "Fréchet distance (lower is better)"), ("accuracy", "digit accuracy (higher is better)"))
COSTS = (("images_per_s", "images/s"), ("block_evaluations", "block evaluations"))
FIGURE_INCHES, DPI = (11.0, 4.2), 90  # per cost row: 990 x 378 pixels


def plot_axes(rows: list[dict]) -> list[tuple[str, str]]:
    """The cost axes the rows allow: images/s always, block evaluations when every row has them."""
    return [(key, label) for key, label in COSTS
            if key == "images_per_s" or (rows and all(isinstance(r.get(key), (int, float)) for r in rows))]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ditrt[quality]'") from None
    matplotlib.use("Agg", force=True)  # files only: never a window, never a display
    import matplotlib.pyplot as plt
    return plt


def check_plot_target(path: str | Path) -> Path:
    """Refuse a plot that could not be written before any sampling: a name other than .png, or no
    matplotlib."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG: give a .png file name, got {path}")
    _pyplot()
    return path


def draw_report(report: dict):
    """The matplotlib Figure: one row per cost axis, one column per metric, each point named
    (labels staggered, so that configurations with equal scores stay readable)."""
    rows = report.get("runs") or []
    if not rows:
        raise InputError("the quality report has no configurations to plot")
    plt = _pyplot()
    costs = plot_axes(rows)
    figure, axes = plt.subplots(len(costs), len(METRICS), figsize=(FIGURE_INCHES[0], FIGURE_INCHES[1] * len(costs)),
                                squeeze=False)
    for j, (cost, cost_label) in enumerate(costs):
        for i, (metric, metric_label) in enumerate(METRICS):
            ax = axes[j][i]
            xs, ys = [r[cost] for r in rows], [r[metric] for r in rows]
            ax.scatter(xs, ys, color="tab:blue", zorder=3)
            for k, (row, x, y) in enumerate(zip(rows, xs, ys)):
                ax.annotate(row["run"], (x, y), textcoords="offset points", xytext=(5, 4 + 10 * (k % 3)), fontsize=8)
            ax.margins(x=0.3, y=0.25)
            ax.set_xlabel(cost_label)
            ax.set_ylabel(metric_label)
            ax.grid(True, alpha=0.3)
    figure.suptitle(f"ditrt quality: {report.get('num_images')} images per configuration, seed {report.get('seed')}",
                    fontsize=10)
    figure.tight_layout()
    return figure


def plot_report(report: dict, path: str | Path) -> Path:
    """Draw the report (draw_report) into the PNG `path`, written under a temporary name and
    renamed."""
    path = check_plot_target(path)
    figure = draw_report(report)
    try:
        with atomic_output(path) as f:
            figure.savefig(f, format="png", dpi=DPI)
    finally:
        _pyplot().close(figure)
    return path
