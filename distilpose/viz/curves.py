"""Training curves from a run directory's metrics.csv: loss terms, and AP per evaluation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from distilpose.errors import BadConfigError
from distilpose.io import MetricsLog
from distilpose.viz.common import new_figure, save_figure

CURVES_SIZE = (10.0, 4.0)
LOSS_CURVES_SIZE = (7.0, 4.5)


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv -> {column: float array} (`metrics_columns` of the rows the trainer's
    `MetricsLog` reads back)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        rows = MetricsLog(path).rows()
    except OSError as e:
        raise BadConfigError(f"{path}: cannot read the metrics file ({e})") from e
    if not rows:
        raise BadConfigError(f"{path}: no rows; expected a header and one row per logged step")
    return metrics_columns(rows)


def metrics_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """metrics.csv rows -> {column: float array}; empty cells (a row without that value) are NaN.

    The trainer's `kind` column ("step" rows every `log_every` steps, "epoch" rows with the
    epoch means and evaluation results) is kept as a str array.
    """
    if not rows:
        return {}

    def number(s) -> float:
        try:
            return float(s) if s not in (None, "") else math.nan
        except (TypeError, ValueError):
            return math.nan

    columns = [c for c in rows[0] if c is not None]
    out = {c: np.array([number(r.get(c)) for r in rows]) for c in columns if c != "kind"}
    if "kind" in columns:
        out["kind"] = np.array([r.get("kind") or "" for r in rows])
    return out


def _is_ap_column(name: str) -> bool:
    # COCO's stats (AP, AP50, ..., AR) as written by periodic evaluation, with or without a prefix.
    return re.fullmatch(r"(?:\w+[/_])?A[PR](?:50|75|m|l)?", name) is not None


def _step_and_loss_rows(metrics: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The x axis of the loss lines (step, else row number) and the rows they come from: the
    step rows when there are any (epoch rows repeat them as means)."""
    n = len(next(iter(metrics.values()))) if metrics else 0
    step = metrics.get("step", np.full(n, np.nan))
    if np.isnan(step).all():
        step = np.arange(n, dtype=float)
    kind = metrics.get("kind", np.full(n, ""))
    loss_rows = kind == "step" if (kind == "step").any() else np.ones(n, bool)
    return step, loss_rows


def plot_losses(ax, metrics: dict[str, np.ndarray]) -> None:
    """The one loss plotter: every loss column (`loss`, `loss_*`) against the step, log y,
    positive finite values only (a log axis)."""
    step, loss_rows = _step_and_loss_rows(metrics)
    losses = [c for c in metrics if c == "loss" or c.startswith("loss_")]
    for c in losses:
        ok = loss_rows & np.isfinite(metrics[c]) & (metrics[c] > 0) & np.isfinite(step)
        if ok.any():
            ax.plot(step[ok], metrics[c][ok], lw=1.5 if c == "loss" else 1.0, label=c)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")


def draw_loss_curves(metrics: dict[str, np.ndarray], out_png: str | Path) -> Path:
    """A run's loss_curves.png: `plot_losses` alone."""
    fig = new_figure(LOSS_CURVES_SIZE)
    ax = fig.add_subplot()
    plot_losses(ax, metrics)
    ax.set_ylabel("loss (log)")
    fig.tight_layout()
    return save_figure(fig, out_png)


def draw_run_loss_curves(run_dir: Path) -> None:
    """run_dir/metrics.csv -> run_dir/loss_curves.png: the `Trainer`'s `on_save` hook the stages
    pass (at checkpoints and at the end of a run), so the training loop imports no drawing code."""
    rows = MetricsLog(run_dir / "metrics.csv").rows()
    draw_loss_curves(metrics_columns(rows), run_dir / "loss_curves.png")


def draw_curves(metrics: dict[str, np.ndarray], out_png: str | Path, title: str = "") -> Path:
    """Loss terms against step (log y) on the left; AP per evaluation, or the lr, on the right."""
    step, loss_rows = _step_and_loss_rows(metrics)
    # `epoch` is the 0-based epoch a row belongs to; an evaluation after it has seen epoch + 1.
    epoch = metrics.get("epoch", np.arange(len(step), dtype=float)) + 1
    fig = new_figure(CURVES_SIZE)
    ax_loss = fig.add_axes((0.07, 0.13, 0.40, 0.77))
    ax_right = fig.add_axes((0.57, 0.13, 0.40, 0.77))
    plot_losses(ax_loss, metrics)
    ax_loss.set_title("loss terms", fontsize=9)

    ap_cols = [c for c in metrics if _is_ap_column(c)]
    for c in ap_cols:
        ok = np.isfinite(metrics[c]) & np.isfinite(epoch)
        if ok.any():
            ax_right.plot(epoch[ok], metrics[c][ok], marker="o", ms=3, label=c)
    if ax_right.lines:
        ax_right.set_xlabel("epochs trained")
        ax_right.set_title("COCO keypoint AP per evaluation", fontsize=9)
        ax_right.legend(fontsize=7, loc="best")
    elif "lr" in metrics and np.isfinite(metrics["lr"]).any():
        ok = loss_rows & np.isfinite(metrics["lr"]) & np.isfinite(step)
        ax_right.plot(step[ok], metrics["lr"][ok], color="k", lw=1.0)
        ax_right.set_xlabel("step")
        ax_right.set_title("learning rate (no evaluation logged)", fontsize=9)
    else:
        ax_right.set_title("no evaluation logged", fontsize=9)
    ax_right.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9, y=0.99)
    return save_figure(fig, out_png)


def viz_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Training curves of a run directory (or a metrics.csv path): losses and AP per evaluation."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / "metrics.csv"
    if not path.is_file():
        raise BadConfigError(f"{path}: no metrics file; expected a run directory with metrics.csv")
    return draw_curves(read_metrics(path), out_png, title=str(path.parent.name))
