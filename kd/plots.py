"""Evaluation figures written as PNG files.

Figures are built with matplotlib.figure.Figure and rendered by the Agg canvas, without pyplot:
no GUI backend is needed and no global figure state is left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import Bbox

from kd.metrics import as_numpy, normalize_rows

STYLE = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "figure.titlesize": 15, "legend.fontsize": 10}
CORRECT, WRONG = "#1b7a36", "#c62828"
PERCENT = FuncFormatter(lambda v, _: f"{v:.0%}")


def label_ticks_apart(ax, scale: float = 1.0, suffix: str = "") -> None:
    """Fix the y ticks and label them (times `scale`) with just the decimals that tell neighbours apart:
    95.25% and 95.5%, never 99%, 99%, 98%."""
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    step = min(np.diff(ticks)) * scale if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(6) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6), 6)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * scale:.{decimals}f}{suffix}"))


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def select_samples(labels, predictions, confidence, count: int = 24, mistakes: int = 6,
                   seed: int = 0) -> np.ndarray:
    """Indices to show: random samples (fixed seed) followed by the most confident mistakes.

    The mistakes are the `mistakes` wrong predictions with the highest confidence (fewer if
    there are fewer); the random part is drawn from the remaining samples.
    """
    labels, predictions, confidence = as_numpy(labels), as_numpy(predictions), as_numpy(confidence)
    wrong = np.flatnonzero(labels != predictions)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:mistakes]
    rest = np.setdiff1d(np.arange(len(labels)), worst)
    rng = np.random.default_rng(seed)
    randoms = np.sort(rng.choice(rest, size=min(count - len(worst), len(rest)), replace=False))
    return np.concatenate([randoms, worst]).astype(int)


def plot_sample_predictions(image_at: Callable[[int], object], labels, probabilities,
                            class_names: Sequence[str], path: Path, count: int = 24, mistakes: int = 6,
                            columns: int = 6, seed: int = 0) -> Path:
    """A grid of test images (image_at(i): image i, (C, H, W)) titled with the true class, the prediction
    and its confidence; only the shown images are read.

    Mistakes have a red title and border; the last row(s) hold the most confident mistakes.
    """
    labels, probabilities = as_numpy(labels), as_numpy(probabilities)
    predictions, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    chosen = select_samples(labels, predictions, confidence, count, mistakes, seed)
    n_mistakes = int(min(mistakes, (labels != predictions).sum()))
    rows = -(-len(chosen) // columns)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(2.3 * columns, 2.7 * rows + 0.8), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, i in zip(axes, chosen):
            _show_prediction(ax, as_numpy(image_at(int(i))), class_names[labels[i]], class_names[predictions[i]],
                             confidence[i])
        for ax in axes[len(chosen):]:
            ax.set_visible(False)
        fig.suptitle(f"Student predictions on test images (red: wrong): {len(chosen) - n_mistakes} at random, "
                     f"then the {n_mistakes} most confident mistakes")
        return _save(fig, path)


def _show_prediction(ax, image: np.ndarray, true: str, predicted: str, confidence: float) -> None:
    image = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    color = CORRECT if true == predicted else WRONG
    ax.set_title(f"true: {true}\npred: {predicted} ({confidence:.0%})", color=color, fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(true != predicted)
        spine.set_color(WRONG)
        spine.set_linewidth(3)


def plot_confusion_matrix(matrix, class_names: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (each row: how one true class was predicted)."""
    counts = as_numpy(matrix)
    rates = normalize_rows(counts)
    n = len(class_names)
    size = max(6.0, 0.75 * n + 2.5)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(size + 1.2, size), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        for (row, col), rate in np.ndenumerate(rates):
            ax.text(col, row, "0" if counts[row, col] == 0 else f"{rate:.2f}", ha="center", va="center",
                    fontsize=9, color="white" if rate > 0.5 else ("#999999" if rate == 0 else "black"))
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
        return _save(fig, path)


def plot_training_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch from a run's metrics.csv rows, the best validation epoch marked."""
    epochs = [r["epoch"] for r in rows]
    best = max(rows, key=lambda r: r["val_acc"])["epoch"]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(13, 5), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train: KD loss (total)")
        loss_ax.plot(epochs, [r["train_ce"] for r in rows], "o--", label="train: cross-entropy part")
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], "s-", label="val: cross-entropy")
        loss_ax.set_ylabel("loss")
        loss_ax.set_title("Loss")
        acc_ax.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train (augmented)")
        acc_ax.plot(epochs, [r["val_acc"] for r in rows], "s-", label="val")
        acc_ax.yaxis.set_major_formatter(PERCENT)
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_title("Accuracy")
        for ax in (loss_ax, acc_ax):
            ax.axvline(best, color="grey", linestyle=":", label=f"best val epoch ({best:g})")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        return _save(fig, path)


@dataclass(frozen=True)
class ModelPoint:
    name: str
    kind: str  # "student", "teacher" or "ensemble"
    params: int
    accuracy: float
    latency_ms: float


MARKERS = {"student": ("*", "#d62728", 320), "teacher": ("o", "#1f77b4", 120), "ensemble": ("D", "#2ca02c", 110)}


def plot_student_vs_teachers(points: Sequence[ModelPoint], path: Path, title: str) -> Path:
    """Test accuracy against parameter count and against CPU latency, one labelled point per model."""
    axes_spec = (("params", "parameters (log scale)", lambda v, _: f"{v / 1e6:g}M"),
                 ("latency_ms", "CPU latency per image at batch 1, ms (log scale)", lambda v, _: f"{v:g}"))
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(13, 5.5), layout="constrained")
        FigureCanvasAgg(fig)  # label placement measures text, which needs a renderer
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (attr, label, tick_format) in zip(axes, axes_spec):
            for point in points:
                marker, color, size = MARKERS[point.kind]
                ax.scatter([getattr(point, attr)], [point.accuracy], marker=marker, color=color, s=size,
                           zorder=3, edgecolors="black", linewidths=0.6)
            _log_x_axis(ax, [getattr(p, attr) for p in points], tick_format)
            ax.set_xlabel(label)
        axes[0].set_ylabel("test accuracy")
        axes[0].set_title("Accuracy vs size")
        axes[1].set_title("Accuracy vs speed")
        accuracies = [p.accuracy for p in points]
        margin = max(0.01, (max(accuracies) - min(accuracies)) * 0.25)  # room for labels above and below
        axes[0].set_ylim(min(accuracies) - margin, max(accuracies) + margin)
        label_ticks_apart(axes[0], scale=100, suffix="%")
        fig.suptitle(title)
        fig.canvas.draw()  # fixes the layout, so label boxes are measured where they will be drawn
        for ax, (attr, _, _) in zip(axes, axes_spec):
            _label_points(ax, points, attr)
        return _save(fig, path)


LABEL_OFFSETS = ((10, 0, "left", "center"), (0, 12, "center", "bottom"), (0, -12, "center", "top"),
                 (-10, 0, "right", "center"))  # points, alignment: right, above, below, left of the marker


def _label_points(ax, points: Sequence[ModelPoint], attr: str) -> None:
    """Label each point at the first offset whose text stays inside the axes and clear of the
    markers and of the labels placed so far (a greedy placement, enough for a handful of models);
    when no offset is free, the first one is used: an overlap beats a missing label."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [_marker_box(ax, point, attr) for point in points]
    for point in points:
        for offset in LABEL_OFFSETS:
            text = _annotate(ax, point, attr, offset)
            box = text.get_window_extent(renderer)
            if _contains(frame, box) and not any(box.overlaps(other) for other in taken):
                break
            text.remove()
        else:
            box = _annotate(ax, point, attr, LABEL_OFFSETS[0]).get_window_extent(renderer)
        taken.append(box)


def _annotate(ax, point: ModelPoint, attr: str, offset):
    dx, dy, ha, va = offset
    return ax.annotate(f"{point.name}\n{point.accuracy:.2%}", (getattr(point, attr), point.accuracy),
                       xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=10,
                       color=MARKERS[point.kind][1])


def _marker_box(ax, point: ModelPoint, attr: str) -> Bbox:
    """The marker's box in display pixels (scatter sizes are areas in points^2)."""
    x, y = ax.transData.transform((getattr(point, attr), point.accuracy))
    radius = np.sqrt(MARKERS[point.kind][2]) / 2 * ax.figure.dpi / 72
    return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _contains(outer, inner) -> bool:
    return outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1


def _log_x_axis(ax, values: Sequence[float], tick_format) -> None:
    """Log x with ticks at 1, 2, 5 x 10^k in plain numbers, and room for the labels."""
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2.5, max(values) * 3)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(tick_format))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")


@dataclass(frozen=True)
class TrialPoint:
    """One tuning trial as the figures need it: its last validation accuracy, and whether it finished."""

    number: int
    val_acc: float | None  # best for a complete trial, the last reported for a pruned one
    complete: bool
    temperature: float | None = None
    alpha: float | None = None


def _complete_and_pruned(points: Sequence[TrialPoint]) -> tuple[list[TrialPoint], list[TrialPoint]]:
    return [p for p in points if p.complete], [p for p in points if not p.complete]


def plot_tuning_history(points: Sequence[TrialPoint], path: Path, title: str) -> Path:
    """Validation accuracy per trial (pruned ones at their last epoch) and the best so far."""
    done, pruned = _complete_and_pruned(points)
    pruned = [p for p in pruned if p.val_acc is not None]  # a diverged run reported no accuracy
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.subplots()
        ax.scatter([p.number for p in done], [p.val_acc for p in done], color="C0", label="complete", zorder=3)
        ax.scatter([p.number for p in pruned], [p.val_acc for p in pruned], color="0.6", marker="x",
                   label="pruned (last epoch reached)", zorder=3)
        if done:
            best = np.maximum.accumulate([p.val_acc for p in done])
            ax.step([p.number for p in done], best, where="post", color="C3", label="best so far")
        ax.yaxis.set_major_formatter(PERCENT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(title)
        return _save(fig, path)


def plot_importances(importances: dict[str, float] | None, path: Path, title: str) -> Path:
    """Horizontal bars of each searched setting's importance; a note when they cannot be estimated yet."""
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.subplots()
        if importances:
            names = list(importances)[::-1]  # most important on top
            ax.barh(names, [importances[n] for n in names], color="C0")
            ax.set_xlabel("importance for validation accuracy (fANOVA, sums to 1)")
        else:
            ax.text(0.5, 0.5, "not enough complete trials to estimate importances", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
        ax.set_title(title)
        return _save(fig, path)


def plot_temperature_alpha(points: Sequence[TrialPoint], path: Path, title: str) -> Path:
    """Each trial at its (temperature, alpha), coloured by validation accuracy; pruned trials grey."""
    done, pruned = _complete_and_pruned(points)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(7.5, 5), layout="constrained")
        ax = fig.subplots()
        ax.scatter([p.temperature for p in pruned], [p.alpha for p in pruned], color="0.6", marker="x",
                   label="pruned")
        if done:
            image = ax.scatter([p.temperature for p in done], [p.alpha for p in done],
                               c=[p.val_acc for p in done], cmap="viridis", s=60, edgecolors="black", zorder=3)
            fig.colorbar(image, ax=ax, label="validation accuracy", format=PERCENT)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("temperature T")
        ax.set_ylabel("alpha (weight of the teacher term)")
        ax.grid(alpha=0.3)
        if pruned:
            ax.legend(loc="best")
        ax.set_title(title)
        return _save(fig, path)
