"""Pictures for MLflow and the report (matplotlib, no display needed): confusion matrices,
training curves across the phases, ROC curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: Path | str) -> Path:
    """A figure written aside and renamed in, as every file the project writes."""
    import io

    from data_pipeline.files import write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return write_atomic(Path(path), buffer.getvalue())


def confusion_matrix_figure(
    matrix: np.ndarray, classes: Sequence[str], title: str, path: Path
) -> Path:
    """Counts in the cells, true classes down the side, predicted across, like the paper's Fig. 3.

    Cells are shaded by their share of the true class (the row), and show it under the count:
    shaded by count, 31 COVID-19 images beside 6,851 normal ones would all look empty.
    """
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=120)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (shade: share of the row)")
    ax.set_title(title, fontsize=10)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{int(value):,}\n{100 * share[i, j]:.1f}%",
            ha="center",
            va="center",
            color="white" if share[i, j] > 0.5 else "black",
            fontsize=10,
        )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def training_curves_figure(history, title: str, path: Path) -> Path:
    """Loss and accuracy per epoch across all phases (training solid, validation dashed), with a
    dotted line where each phase ends and the phase number above its stretch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    steps = history["step"].to_numpy()
    ends = history.groupby("phase")["step"].max()
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=False):
        for key, style, label in ((metric, "-", "training"), (f"val_{metric}", "--", "validation")):
            if key in history and history[key].notna().any():
                rows = history[history[key].notna()]
                ax.plot(
                    rows["step"],
                    rows[key],
                    style,
                    marker="." if len(rows) < 40 else None,
                    label=label,
                )
        start = steps.min() - 0.5
        for phase, end in ends.items():
            if end < steps.max():
                ax.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(
                (start + end + 0.5) / 2,
                1.01,
                str(phase),
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="grey",
            )
            start = end + 0.5
        ax.set_xlabel("epoch (across phases; phase numbers above)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def roc_figure(predictions: dict, classes: Sequence[str], title: str, path: Path) -> Path:
    """One panel per class: the one-vs-rest ROC curve of each fold (thin) and their mean (thick,
    true-positive rates averaged at fixed false-positive rates), AUCs in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    grid = np.linspace(0, 1, 201)
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 4.4), dpi=110)
    for ax, name in zip(np.atleast_1d(axes), classes, strict=False):
        curves, aucs = [], []
        for fold, table in predictions.items():
            truth = (table["label"] == name).to_numpy()
            if truth.all() or not truth.any():
                continue  # a ROC curve needs positives and negatives
            fpr, tpr, _ = roc_curve(truth, table[f"p_{name}"])
            aucs.append(roc_auc_score(truth, table[f"p_{name}"]))
            curves.append(np.interp(grid, fpr, tpr))
            ax.plot(
                fpr,
                tpr,
                linewidth=0.9,
                alpha=0.6,
                label=f"{f'fold {fold}' if isinstance(fold, int) else fold} (AUC {aucs[-1]:.3f})",
            )
        if curves:
            ax.plot(
                grid,
                np.mean(curves, axis=0),
                color="black",
                linewidth=2,
                label=(
                    f"mean (AUC {np.mean(aucs):.3f} "
                    f"± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f})"
                ),
            )
        else:
            ax.text(
                0.5,
                0.5,
                "no fold has both positives\nand negatives of this class",
                ha="center",
                va="center",
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="false-positive rate",
            ylabel="true-positive rate",
            title=f"{name} vs rest",
            aspect="equal",
        )
        if curves:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ROC curves, {title}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def reliability_figure(bins, ece: float | None, title: str, path: Path) -> Path:
    """The reliability diagram: each bin's accuracy against its mean top-label confidence (bars
    at the bins, the diagonal a calibrated model's), the images per bin below."""
    fig, (ax, counts) = plt.subplots(
        2, 1, figsize=(4.8, 5.4), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    filled = bins[bins["n"] > 0]
    ax.bar(
        filled["low"],
        filled["accuracy"],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy of the bin",
    )
    ax.plot(
        filled["confidence"],
        filled["accuracy"],
        "o",
        color="black",
        markersize=3,
        label="at its mean confidence",
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        ylabel="accuracy",
        title=f"{title}\nECE {ece:.1f}%" if ece is not None else title,
    )
    ax.legend(fontsize=7, loc="upper left")
    counts.bar(bins["low"], bins["n"], width=width, align="edge", edgecolor="black", color="grey")
    counts.set(xlabel="top-label confidence", ylabel="images")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def gradcam_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    probabilities: np.ndarray,
    classes: Sequence[str],
    explained: str,
    title: str,
    path: Path,
) -> Path:
    """The image beside one overlay per Grad-CAM map (a concatenated network has three: each
    backbone's and their combination's), captioned with the class probabilities."""
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1), 3.1), dpi=110)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("image", fontsize=9)
    for ax, (name, cam) in zip(axes[1:], maps.items(), strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"Grad-CAM {explained}\n({name})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    caption = "   ".join(f"{c}: {p:.3f}" for c, p in zip(classes, probabilities, strict=False))
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.02, caption, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def comparison_figure(table, baseline: str, path: Path) -> Path:
    """`cxr compare`: per network, each config's accuracy (mean over folds, std as the error bar;
    the pooled figure as a dot where there is one), the always-normal baseline as a line per
    config."""
    configs = list(dict.fromkeys(table["config"]))
    networks = [n for n in dict.fromkeys(table["network"]) if n != baseline]
    width = 0.8 / max(1, len(configs))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(networks), 3.6), dpi=120)
    for i, config in enumerate(configs):
        mine = table[table["config"] == config].set_index("network")
        x = np.arange(len(networks)) + (i - (len(configs) - 1) / 2) * width
        means = [mine.loc[n, "accuracy"] if n in mine.index else np.nan for n in networks]
        stds = [mine.loc[n, "accuracy_std"] if n in mine.index else np.nan for n in networks]
        bars = ax.bar(x, means, width * 0.9, yerr=np.nan_to_num(stds), capsize=3, label=config)
        pooled = [mine.loc[n, "pooled_accuracy"] if n in mine.index else np.nan for n in networks]
        ax.plot(x, pooled, "o", color="black", markersize=4, label="pooled" if i == 0 else None)
        if baseline in mine.index:
            ax.axhline(
                mine.loc[baseline, "accuracy"],
                color=bars.patches[0].get_facecolor(),
                linestyle="--",
                linewidth=1,
            )
    ax.set_xticks(np.arange(len(networks)), networks)
    ax.set_ylabel("accuracy (%); dashed: always normal")
    ax.set_title("protocols side by side", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)
