"""Pictures of a trained network, and the command that draws them.

* ``plot_curves``        train/test (and validation) loss and accuracy per epoch
* ``plot_confusion``     the test-set confusion matrix, counts in the cells
* ``plot_filters``       the first conv layer's filters, one tile each
* ``plot_activations``   what every conv (after its ReLU) and pooling layer
                         makes of one image: the seed post's promised view
* ``plot_misclassified`` the test images the network gets wrong, most confident first
* ``render_report``      all of the above into one folder (what a finished run logs),
                         plus the per-class table (``dpcnn.metrics``) as CSV

Figures are drawn on ``matplotlib.figure.Figure`` with no pyplot, so nothing
here touches matplotlib's global backend or leaks figures.

Command line, no MLflow server needed for a checkpoint::

    python -m dpcnn.viz checkpoint=outputs/2026-01-01/12-00-00/checkpoints/last.npz
    python -m dpcnn.viz run_id=<mlflow run id> [tracking_uri=sqlite:///mlflow.db] [out=viz/<run id>]

Other keys: ``images=4`` (activation maps drawn), ``data_root=<folder with the
dataset>`` (default: the run's ``data.root``, then ``$DPCNN_DATA_DIR``).
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cli import download_run_checkpoint, parse_kv
from .data import load_data
from .errors import DpcnnError
from .layers import Conv2D
from .metrics import confusion_matrix, layer_activations, per_class_metrics, to_display, write_csv
from .store import fail_fast

if TYPE_CHECKING:
    from .sweep.record import TrialRecord

DPI = 80


def _figure(width: float, height: float, layout: str | None = "constrained"):
    """A pyplot-free figure. Constrained layout only for figures with few axes: its cost grows with them."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------ figures

def plot_curves(history: Sequence[Mapping], path: str | Path, title: str = "learning curves") -> Path:
    """Loss and accuracy per epoch for each of train/val/test present in ``history``."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    styles = {"train": ("C0", "o"), "val": ("C2", "s"), "test": ("C1", "^")}
    for split, (color, marker) in styles.items():
        for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
            key = f"{split}_{what}"
            pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
            if pts:
                xs, ys = zip(*pts)
                ys = [100 * y for y in ys] if what == "acc" else ys
                ax.plot(xs, ys, color=color, marker=marker, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xticks(sorted(set(epochs)) if len(set(epochs)) <= 20 else ax.get_xticks())
    fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                   title: str = "confusion matrix (test set)") -> Path:
    """Rows: true class; columns: predicted. Colour: share of the row; text: counts."""
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure(1.6 + 0.55 * k, 1.2 + 0.5 * k)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if
                  max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: {np.trace(cm)}/{cm.sum()} correct")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def plot_filters(W: np.ndarray, path: str | Path, title: str = "first conv layer filters") -> Path:
    """One tile per output channel of ``W`` ``(f, f, c_in, c_out)``; several input channels are averaged.

    One symmetric colour scale for all tiles (red positive, blue negative), so
    filters can be compared with each other.
    """
    W = np.asarray(W, np.float32)
    tiles = W.mean(axis=2) if W.shape[2] > 1 else W[:, :, 0]
    n = tiles.shape[-1]
    rows, cols = _grid(n, 8)
    lim = float(np.abs(tiles).max()) or 1.0
    fig = _figure(1.2 * cols + 1.2, 1.2 * rows + 0.6, layout=None)
    fig.subplots_adjust(left=0.02, right=1 - 1.3 / (1.2 * cols + 1.2), bottom=0.02,
                        top=1 - 0.6 / (1.2 * rows + 0.6), wspace=0.15, hspace=0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    im = None
    for j, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if j < n:
            im = ax.imshow(tiles[:, :, j], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"#{j}", fontsize=8)
        else:
            ax.axis("off")
    extra = f" (mean over {W.shape[2]} input channels)" if W.shape[2] > 1 else ""
    fig.suptitle(f"{title}: {n} filters {W.shape[0]}x{W.shape[1]}{extra}")
    cax = fig.add_axes([1 - 1.0 / (1.2 * cols + 1.2), 0.1, 0.2 / (1.2 * cols + 1.2), 0.75])
    fig.colorbar(im, cax=cax, label="weight")
    return _save(fig, path)


def _mosaic(maps: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
    """``(h, w, c)`` maps -> one ``(rows*(h+gap), cols*(w+gap))`` image, each map scaled to [0, 1]; gaps NaN."""
    h, w, c = maps.shape
    lo, hi = maps.min(axis=(0, 1)), maps.max(axis=(0, 1))
    scaled = (maps - lo) / np.where(hi > lo, hi - lo, 1)
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + gap) - gap, min(c, cols) * (w + gap) - gap), np.nan, np.float32)
    for ch in range(c):
        r, col = divmod(ch, cols)
        out[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = scaled[..., ch]
    return out


def plot_activations(image: np.ndarray, activations: Sequence[tuple[str, np.ndarray]], path: str | Path,
                     title: str = "", max_channels: int = 32, cols: int = 16) -> Path:
    """The input, then each layer's feature maps (one tile per channel, each on its own colour scale).

    ``image`` is ``(h, w)`` in [0, 1]; ``activations`` are ``(label, (h', w', c))``
    for this one image. At most ``max_channels`` channels per layer are shown.
    Each layer is one mosaic image, so the figure has a handful of axes, not
    one per channel (10x faster to draw).
    """
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    cols = max(1, min(cols, max((min(a.shape[-1], max_channels) for _, a in activations), default=1)))
    blocks = []
    for label, a in activations:
        c = min(a.shape[-1], max_channels)
        more = f", first {max_channels}" if a.shape[-1] > max_channels else ""
        blocks.append((f"{label}  ({a.shape[0]}x{a.shape[1]}x{a.shape[-1]}{more})", _mosaic(a[..., :c], cols),
                       math.ceil(c / cols), min(c, cols)))
    margin, title_in, tile_in = 0.15, 0.28, 0.72  # inches
    width_in = max(cols * tile_in, 7.0) + 2 * margin  # room for the titles
    top_in = 0.45 if title else 0.1
    total = top_in + title_in + 1.5 * tile_in + sum(title_in + rows * tile_in for _, _, rows, _ in blocks) + margin
    fig = _figure(width_in, total, layout=None)
    y = total - top_in

    def place(h_in, w_in):
        nonlocal y
        y -= title_in + h_in
        return fig.add_axes([margin / width_in, y / total, w_in / width_in, h_in / total])

    ax = place(1.5 * tile_in, 1.5 * tile_in)
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.set_title("input", fontsize=9, loc="left")
    ax.set_axis_off()
    for label, m, rows, ncols in blocks:
        ax = place(rows * tile_in, ncols * tile_in)
        ax.imshow(m, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, y=1 - 0.1 / total, va="top")
    return _save(fig, path)


def plot_misclassified(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray,
                       path: str | Path, class_names: Sequence[str] | None = None, max_n: int = 36,
                       total: int | None = None) -> Path:
    """The given wrong predictions in a grid: "true -> predicted (confidence)"."""
    n = min(len(images), max_n)
    names = class_names
    rows, cols = _grid(max(n, 1), 9)
    fig = _figure(1.25 * cols, 1.45 * rows + 0.5, layout=None)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / (1.45 * rows + 0.5), wspace=0.1,
                        hspace=0.35)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for j, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if j < n:
            ax.imshow(images[j], cmap="gray", vmin=0, vmax=1)
            t, p = (names[y_true[j]], names[y_pred[j]]) if names else (y_true[j], y_pred[j])
            ax.set_title(f"{t}→{p} ({confidence[j]:.0%})", fontsize=8, color="C3")
        else:
            ax.axis("off")
    shown = f"{n} of {total}" if total is not None and total > n else f"{n}"
    fig.suptitle(f"misclassified test images ({shown}, most confident first): true→predicted (probability)"
                 if n else "no misclassified test images")
    return _save(fig, path)


# ------------------------------------------------------------------ the report

def _pick_examples(y: np.ndarray, n: int) -> list[int]:
    """The first test image of each class in turn, up to n (so the maps show different digits)."""
    picked, seen = [], set()
    for i, label in enumerate(y):
        if len(picked) >= n:
            break
        if int(label) not in seen:
            picked.append(i)
            seen.add(int(label))
    for i in range(len(y)):  # fewer classes than n
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return picked


def render_report(model, x: np.ndarray, y: np.ndarray, out_dir: str | Path, *, history: Sequence[Mapping] = (),
                  mean: float = 0.0, std: float = 1.0, class_names: Sequence[str] | None = None,
                  activation_images: int = 4, probs: np.ndarray | None = None) -> dict:
    """Draw every picture of a trained ``model`` on test data into ``out_dir``.

    ``x`` is what the model eats (normalised, ``(n, h, w, c)``), ``y`` the labels;
    ``mean``/``std`` undo the normalisation for display. Returns
    ``{"files": [paths], "confusion": cm, "table": per-class columns, "accuracy": float}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if probs is None:
        probs = model.predict_proba(x)
    pred = probs.argmax(axis=1)
    k = probs.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    files = []
    if history:
        files.append(plot_curves(history, out_dir / "learning_curves.png"))
    cm = confusion_matrix(y, pred, k)
    files.append(plot_confusion(cm, out_dir / "confusion_matrix.png", names))
    table = per_class_metrics(cm, names)
    files.append(write_csv(table, out_dir / "per_class_metrics.csv"))
    convs = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, Conv2D)]
    if convs:
        i, conv = convs[0]
        files.append(plot_filters(conv.W, out_dir / f"filters_layer{i}.png", title=f"layer {i} (first conv) filters"))
    if activation_images > 0 and convs:
        idx = _pick_examples(y, activation_images)
        acts = layer_activations(model, x[idx])
        shown = to_display(x[idx], mean, std)
        for j, i in enumerate(idx):
            per_image = [(label, a[j]) for label, a in acts]
            t, p = names[int(y[i])], names[int(pred[i])]
            files.append(plot_activations(shown[j], per_image, out_dir / "activations" / f"test_{i:05d}.png",
                                          title=f"test image {i}: true {t}, predicted {p} ({probs[i, pred[i]]:.1%})"))
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:36]
    files.append(plot_misclassified(to_display(x[order], mean, std), y[order], pred[order],
                                    probs[order, pred[order]], out_dir / "misclassified.png", names,
                                    total=len(wrong)))
    return {"files": files, "confusion": cm, "table": table, "accuracy": float((pred == y).mean()) if len(y) else 0.0}


# ------------------------------------------------------------------ command line

USAGE = __doc__[__doc__.index("Command line"):]


def main(argv: Sequence[str] | None = None) -> int:
    fail_fast()  # the same HTTP limits as training: one line within seconds when the server is away
    args = parse_kv(sys.argv[1:] if argv is None else argv,
                    ("run_id", "checkpoint", "out", "images", "tracking_uri", "data_root"), USAGE)
    if ("run_id" in args) == ("checkpoint" in args):
        raise SystemExit("error: give exactly one of run_id=<mlflow run id> or checkpoint=<path to .npz>")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "run_id" in args:
                path = download_run_checkpoint(args["run_id"], args.get("tracking_uri"), tmp)
                default_out = Path("viz") / args["run_id"]
            else:
                path = Path(args["checkpoint"])
                default_out = Path("viz") / (path.parent.parent.name if path.parent.name == "checkpoints"
                                             else path.stem)
            # Here, not at the top: serving imports mlflow.pyfunc (seconds), and train and the sweep import viz.
            from .serving import load_checkpoint

            model, spec, cfg, history = load_checkpoint(path)
        data_cfg = dict(cfg["data"])
        if args.get("data_root"):
            data_cfg["root"] = args["data_root"]
        data_cfg["progress"] = False
        data = load_data(data_cfg)
        x, y = data.test
        out = Path(args.get("out") or default_out)
        report = render_report(model, x, y, out, history=history, mean=spec["mean"], std=spec["std"],
                               class_names=spec["class_names"], activation_images=int(args.get("images", 4)))
    except DpcnnError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"test accuracy {report['accuracy']:.2%} on {len(y):,} images; wrote {len(report['files'])} files to {out}:")
    for f in report["files"]:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def summary_plot(records: list[TrialRecord], space: dict[str, str], objective: str, direction: str,
                 path: Path) -> Path:
    """Objective vs each swept parameter (failed trials as red crosses at the bottom), and the history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(space)
    n = len(keys) + 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    ok = [r for r in records if math.isfinite(r.objective)]
    lo, hi = min((r.objective for r in ok), default=0.0), max((r.objective for r in ok), default=1.0)
    floor = lo - 0.08 * ((hi - lo) or 0.1)  # where failed trials are drawn: below every real value
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        vals = [r.values.get(key) for r in records]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None)
        if numeric:
            pos = {id(r): r.values.get(key) for r in records}
            positive = [v for v in vals if v is not None and v > 0]
            if "log" in space[key] or (len(positive) == len(vals) and positive and max(positive) / min(positive) >= 10):
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in vals}, key=str)
            pos = {id(r): labels.index(str(r.values.get(key))) for r in records}
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        good = [r for r in ok if pos[id(r)] is not None]
        ax.scatter([pos[id(r)] for r in good], [r.objective for r in good], color="C0", zorder=3)
        bad = [r for r in records if not math.isfinite(r.objective) and pos[id(r)] is not None]
        if bad:
            ax.scatter([pos[id(r)] for r in bad], [floor] * len(bad), marker="x", color="red", label="failed", zorder=3)
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(rows, cols, n)
    best, running = [], None
    pick = max if direction == "maximize" else min
    for r in sorted(ok, key=lambda r: r.number):
        running = r.objective if running is None else pick(running, r.objective)
        best.append((r.number, running))
    ax.scatter([r.number for r in ok], [r.objective for r in ok], color="C0", label="trial", zorder=3)
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="C1", label="best so far")
    bad = [r for r in records if not math.isfinite(r.objective)]
    if bad:
        ax.scatter([r.number for r in bad], [floor] * len(bad), marker="x", color="red", label="failed", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("optimisation history")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path
