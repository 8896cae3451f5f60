"""The numbers behind viz's pictures, no matplotlib needed.

* ``confusion_matrix``   ``cm[t, p]``: examples of class t predicted as p
* ``per_class_metrics``  precision, recall, F1 and support per class (``write_csv`` writes it)
* ``layer_activations``  what every conv (after its ReLU) and pooling layer makes of some inputs
* ``to_display``         normalised network inputs back to [0, 1] pixels
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .layers import AvgPool2D, Conv2D, MaxPool2D, ReLU


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[t, p]`` = number of examples of class t predicted as p, int64 ``(k, k)``."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_metrics(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, list]:
    """Columns ``class, precision, recall, f1, support`` (0 where a ratio has no denominator)."""
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {"class": names, "precision": [round(float(v), 4) for v in precision],
            "recall": [round(float(v), 4) for v in recall], "f1": [round(float(v), 4) for v in f1],
            "support": [int(v) for v in support]}


def write_csv(table: Mapping[str, list], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(table))
        w.writerows(zip(*table.values()))
    return path


def layer_activations(model, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``[(label, activations (m, h, w, c))]`` for every conv and pooling layer, for inputs ``x``.

    Runs the model's plain layers one by one (not the fused plan training uses),
    so every intermediate exists. A conv directly followed by a ReLU is shown
    after the ReLU, as "conv 0 + relu": what the next layer actually receives.
    """
    out, layers = [], model.layers
    h = np.asarray(x, model.dtype)
    for i, layer in enumerate(layers):
        h = np.array(layer.forward(h, train=False), copy=True)  # layers may reuse their output buffers
        if isinstance(layer, Conv2D):
            if i + 1 < len(layers) and isinstance(layers[i + 1], ReLU):
                continue  # shown after its ReLU
            out.append((f"layer {i}: conv {layer.kernel_size}x{layer.kernel_size}", h))
        elif isinstance(layer, ReLU) and i > 0 and isinstance(layers[i - 1], Conv2D):
            conv = layers[i - 1]
            out.append((f"layers {i - 1}-{i}: conv {conv.kernel_size}x{conv.kernel_size} + relu", h))
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            kind = "max" if isinstance(layer, MaxPool2D) else "avg"
            out.append((f"layer {i}: {kind}pool {layer.kernel_size}x{layer.kernel_size}", h))
    return out


def to_display(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Normalised network inputs back to [0, 1] pixels, ``(m, h, w)`` for one channel."""
    img = np.clip(np.asarray(x, np.float32) * np.float32(std) + np.float32(mean), 0, 1)
    return img[..., 0] if img.shape[-1] == 1 else img
