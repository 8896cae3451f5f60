"""Pictures, numbers and model files, in process (no mpirun, no MLflow server)."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import numpy as np
import pytest
import yaml

from dpcnn import metrics, viz
from dpcnn.errors import DpcnnError
from dpcnn.predict import load_images
from dpcnn.serving import (DpcnnPyfunc, build_model, load_model_files, model_spec, normalise, predict_proba,
                           save_model_files, to_unit_images)

from conftest import REPO


def spec_of(name: str) -> dict:
    layers = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())["layers"]
    return model_spec(layers, (28, 28, 1), 10, mean=0.1307, std=0.3081, dataset="mnist")


def test_confusion_matrix_and_per_class_metrics():
    cm = metrics.confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    table = metrics.per_class_metrics(cm, ["a", "b", "c"])
    assert table["precision"] == [0.5, 0.6667, 0.0]  # class c is never predicted: 0, not NaN
    assert table["recall"] == [0.5, 1.0, 0.0]
    assert table["f1"] == [0.5, 0.8, 0.0]
    assert table["support"] == [2, 2, 1] and table["class"] == ["a", "b", "c"]


def test_layer_activations_follow_the_network():
    model = build_model(spec_of("small"))
    x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
    logits = model.forward(x, train=False).copy()
    acts = metrics.layer_activations(model, x)
    assert [label for label, _ in acts] == ["layers 0-1: conv 3x3 + relu", "layer 2: maxpool 2x2",
                                            "layers 3-4: conv 3x3 + relu", "layer 5: maxpool 2x2"]
    assert [a.shape for _, a in acts] == [(3, 28, 28, 16), (3, 14, 14, 16), (3, 14, 14, 32), (3, 7, 7, 32)]
    assert acts[0][1].min() == 0 and acts[0][1].max() > 0  # after the ReLU
    pooled = acts[0][1].reshape(3, 14, 2, 14, 2, 16).max(axis=(2, 4))
    assert np.array_equal(acts[1][1], pooled)
    # Running the plain layers leaves the model's (fused) forward pass untouched.
    assert np.array_equal(model.forward(x, train=False), logits)


def test_render_report_draws_every_picture(tmp_path):
    spec = spec_of("tiny")
    model = build_model(spec)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 28, 28, 1)).astype(np.float32)
    y = np.arange(60) % 10
    history = [{"epoch": 1, "train_loss": 2.0, "test_loss": 1.5, "train_acc": 0.3, "test_acc": 0.4},
               {"epoch": 2, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.6, "test_acc": 0.55}]
    report = viz.render_report(model, x, y, tmp_path, history=history, mean=spec["mean"], std=spec["std"],
                               class_names=spec["class_names"], activation_images=2)
    names = sorted(str(p.relative_to(tmp_path)) for p in report["files"])
    assert names == ["activations/test_00000.png", "activations/test_00001.png", "confusion_matrix.png",
                     "filters_layer0.png", "learning_curves.png", "misclassified.png", "per_class_metrics.csv"]
    for p in report["files"]:
        if p.suffix == ".png":
            img = matplotlib.image.imread(p)
            assert img.ndim == 3 and min(img.shape[:2]) > 100 and img[..., :3].std() > 0.05, p
    pred = model.predict(x)
    assert report["accuracy"] == pytest.approx(np.mean(pred == y))
    assert report["confusion"].sum() == 60 and np.trace(report["confusion"]) == np.sum(pred == y)
    rows = list(csv.reader(open(tmp_path / "per_class_metrics.csv")))
    assert rows[0] == ["class", "precision", "recall", "f1", "support"] and len(rows) == 11
    assert [int(r[4]) for r in rows[1:]] == [6] * 10


def test_images_in_every_accepted_layout_become_the_same_pixels():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    want = raw.astype(np.float32) / 255
    for x in (raw, raw[..., 0], raw.reshape(5, 784), want, want.reshape(5, 784), raw.astype(np.float32),
              raw.astype(np.int64).tolist()):
        assert np.allclose(to_unit_images(x, (28, 28, 1)), want, atol=1e-7)
    assert to_unit_images(raw[0, ..., 0], (28, 28, 1)).shape == (1, 28, 28, 1)  # one image
    for bad, message in ((raw.reshape(5, 784)[:, :700], "expected images of shape"),
                         (-want, "pixels must be within"), (raw.astype(np.int64) + 300, "within 0..255"),
                         (np.full((1, 784), np.nan), "finite")):
        with pytest.raises(ValueError, match=message):
            to_unit_images(bad, (28, 28, 1))


def test_model_files_round_trip_and_pyfunc_predict(tmp_path):
    import pandas as pd

    spec = spec_of("tiny")
    model = build_model(spec)
    model.init(seed=3)
    paths = save_model_files(tmp_path, model.params, spec)
    loaded, spec2 = load_model_files(paths["weights"], paths["spec"])
    assert spec2 == json.loads(json.dumps(spec)) and np.array_equal(loaded.params, model.params)
    raw = np.random.default_rng(4).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    expected = model.predict(normalise(raw[..., None] / np.float32(255), spec))
    assert np.array_equal(predict_proba(loaded, spec2, raw).argmax(1), expected)

    wrapper = DpcnnPyfunc()
    wrapper.load_context(type("Ctx", (), {"artifacts": paths})())
    out = wrapper.predict(None, pd.DataFrame(raw.reshape(7, 784)))
    assert out["label"].tolist() == expected.tolist()
    assert np.allclose(out.filter(like="prob_").sum(axis=1), 1, atol=1e-5)

    with pytest.raises(DpcnnError, match="belong to another model"):
        build_model(spec_of("small"), model.params)
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "format": 99}))
    with pytest.raises(DpcnnError, match="newer than this dpcnn reads"):
        load_model_files(paths["weights"], paths["spec"])


def test_png_loading_inverts_light_backgrounds(tmp_path):
    digit = np.zeros((28, 28), np.float32)
    digit[6:22, 12:16] = 1.0  # a white "1" on black, as in MNIST
    matplotlib.image.imsave(tmp_path / "white_on_black.png", digit, cmap="gray", vmin=0, vmax=1)
    rgb = np.repeat((1 - digit)[..., None], 3, axis=-1)  # the same digit drawn black on white, RGB
    matplotlib.image.imsave(tmp_path / "black_on_white.png", rgb)
    paths = [tmp_path / "white_on_black.png", tmp_path / "black_on_white.png"]
    images, sources, inverted = load_images(paths, (28, 28, 1))
    assert inverted == 1 and sources == [str(p) for p in paths]
    assert images.shape == (2, 28, 28, 1)
    assert images.dtype == np.uint8  # decoded by Pillow: 0-255
    assert np.allclose(images[0, ..., 0] / 255, digit, atol=1 / 255)
    assert np.allclose(images[1, ..., 0] / 255, digit, atol=1 / 255)
    _, _, inverted = load_images(paths, (28, 28, 1), invert="false")
    assert inverted == 0
    matplotlib.image.imsave(tmp_path / "big.png", np.zeros((32, 32)), cmap="gray")
    images, _, _ = load_images([tmp_path / "big.png"], (28, 28, 1))  # another size: resized, with a warning
    assert images.shape == (1, 28, 28, 1)
