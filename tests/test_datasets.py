"""Bring your own data, never the wrong data: identification by MD5, CIFAR-10, .npz, image folders, predict's resize.

No copy of CIFAR-10 is available offline: the tests write small files in the
exact official binary format (``cifar-10-binary.tar.gz``: ``data_batch_1..5.bin``,
``test_batch.bin``, ``batches.meta.txt``; records of 1 label byte + 3072 CHW
pixel bytes) and serve them with the local HTTP server of the download tests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import tarfile
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint, images
from dpcnn.data import get_spec, load_data, prepare
from dpcnn.errors import ConfigError, DataError
from dpcnn.predict import load_images
from dpcnn.readers import read_cifar10, read_npz

from conftest import MNIST_5K, SHARED_DATA, check_ok, needs_data, run_train, train_env
from test_data import assert_one_line
from test_data_download import Handler

QUIET = ["trainer.progress=false", "trainer.collective_timeout=60", "trainer.setup_timeout=60"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------ CIFAR-10 in its official format

def cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n records of the official binary format: (bytes, CHW images (n, 3, 32, 32), labels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    chw[:, labels % 3, :4, :4] = 255  # a bright corner in one channel, so there is something to learn
    records = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1)
    return records.tobytes(), chw, labels


def write_cifar(folder: Path, per_batch: int = 40, n_test: int = 40) -> tuple[Path, dict]:
    """``folder/cifar-10-binary.tar.gz`` as the CIFAR site ships it; returns (path, {member: (chw, labels)})."""
    folder.mkdir(parents=True, exist_ok=True)
    members, arrays = {}, {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        blob, chw, labels = cifar_batch(n_test if name == "test_batch.bin" else per_batch, seed=i)
        members[name], arrays[name] = blob, (chw, labels)
    members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    path = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, arrays


def test_cifar10_reader_reads_the_official_layout_from_the_tarball_and_the_extracted_folder(tmp_path):
    path, arrays = write_cifar(tmp_path)
    x, y, x_test, y_test, names = read_cifar10(path)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8 and x_test.shape == (40, 32, 32, 3)
    chw, labels = arrays["data_batch_2.bin"]  # records 40..79: CHW planes -> NHWC
    np.testing.assert_array_equal(x[40:80], chw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y[40:80], labels)
    np.testing.assert_array_equal(x_test[5, 7, 9], arrays["test_batch.bin"][0][5, :, 7, 9])  # pixel (7, 9), RGB
    assert list(names) == CLASSES
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    again = read_cifar10(tmp_path / "x" / "cifar-10-batches-bin")
    assert all(np.array_equal(a, b) for a, b in zip(again, (x, y, x_test, y_test))) and list(again[4]) == CLASSES


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[:-100], "not a whole number of 3073-byte records"),
    (lambda b: bytes([12]) + b[1:], "label 12 outside 0..9"),
])
def test_cifar10_damaged_batches_are_one_line_errors(tmp_path, damage, needle):
    _, arrays = write_cifar(tmp_path / "src")
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, (chw, labels) in arrays.items():
        blob = np.concatenate([labels[:, None], chw.reshape(len(labels), -1)], axis=1).tobytes()
        (folder / name).write_bytes(damage(blob) if name == "data_batch_3.bin" else blob)
    with pytest.raises(DataError) as err:
        read_cifar10(folder)
    assert_one_line(err, "data_batch_3.bin", needle)
    (tmp_path / "cut.tar.gz").write_bytes((tmp_path / "src" / "cifar-10-binary.tar.gz").read_bytes()[:5000])
    with pytest.raises(DataError) as err:
        read_cifar10(tmp_path / "cut.tar.gz")
    assert_one_line(err, "truncated or corrupt archive")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The download tests' HTTP server (same routes: good/, corrupt/, ...), serving a synthetic CIFAR-10."""
    files = tmp_path_factory.mktemp("cifar-served")
    path, arrays = write_cifar(files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.hits = files, Counter()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.md5(path.read_bytes()).hexdigest(), arrays
    httpd.shutdown()
    httpd.server_close()


def test_cifar10_download_checks_the_md5_and_falls_back(mirror, tmp_path, caplog):
    url, md5, arrays = mirror
    cfg = {"name": "cifar10", "root": str(tmp_path), "progress": False,
           "mirrors": [f"{url}/corrupt/", f"{url}/good/"], "md5": {"cifar-10-binary.tar.gz": md5}}
    data = load_data(cfg)  # the corrupt mirror's bytes fail the MD5; the good one's are kept
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == ["cifar-10-binary.tar.gz"]
    assert data.input_shape == (32, 32, 3) and data.class_names == tuple(CLASSES) and data.num_classes == 10
    assert data.identity.status == "verified" and data.identity.md5 == {"cifar-10-binary.tar.gz": md5}
    # Per-channel normalisation with the registry's CIFAR-10 statistics; the fill of shifts is each channel's black.
    chw = arrays["data_batch_1.bin"][0]
    mean, std = np.array(get_spec("cifar10").mean), np.array(get_spec("cifar10").std)
    np.testing.assert_allclose(data.train[0][3], (chw[3].transpose(1, 2, 0) / 255 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(data.background, -mean / std, rtol=1e-6)
    # The same synthetic files under the registry's checksums: not the official CIFAR-10, one warning.
    with caplog.at_level(logging.WARNING, logger="dpcnn"):
        identity = prepare({"name": "cifar10", "root": str(tmp_path)})
    assert identity.status == "unknown" and "match no known copy (cifar-10-binary.tar.gz)" in caplog.text
    with pytest.raises(DataError) as err:
        prepare({"name": "cifar10", "root": str(tmp_path), "verify_checksum": True})
    assert_one_line(err, "data.verify_checksum=true accepts only the official files")


# ------------------------------------------------------------------ never the wrong data

def test_files_are_identified_before_training(tmp_path, caplog):
    needs_data()
    with caplog.at_level(logging.WARNING, logger="dpcnn"):
        subset = prepare({"name": "mnist", "root": str(MNIST_5K)})
    assert subset.status == "unknown" and subset.unknown == ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    assert caplog.text.count("match no known copy") == 1  # one warning
    tags = subset.tags()
    assert tags["dpcnn.data.identity"] == "unknown" and tags["dpcnn.data.files_digest"] == subset.digest
    with pytest.raises(DataError) as err:  # MNIST's files asked for as Fashion-MNIST: both named, one line
        prepare({"name": "fashion_mnist", "root": str(MNIST_5K)})
    assert_one_line(err, "is mnist's t10k-images-idx3-ubyte.gz", "not fashion_mnist's", "data=mnist")
    # The official MNIST test files, re-compressed: still MNIST's (by the MD5 of the decompressed bytes).
    (tmp_path / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "mnist" / name).write_bytes(gzip.compress(gzip.decompress((MNIST_5K / name).read_bytes()), 1))
    with pytest.raises(DataError) as err:
        prepare({"name": "fashion_mnist", "root": str(tmp_path / "mnist"), "download": False})
    assert_one_line(err, "is mnist's t10k-", "not fashion_mnist's")
    fashion = SHARED_DATA / "fashion-mnist"
    if fashion.is_dir():  # Debian's re-compressed copy: known by its decompressed MD5s
        assert prepare({"name": "fashion_mnist", "root": str(fashion)}).status == "official"


def test_wrong_dataset_stops_every_rank_with_one_line(workdir):
    needs_data()
    # The case: a folder of MNIST files, asked for as Fashion-MNIST.
    proc = run_train(2, "data=fashion_mnist", "model=tiny", "tracking=none", *QUIET, cwd=workdir, timeout=120,
                     env=train_env(DPCNN_DATA_DIR=MNIST_5K))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dpcnn: error:")]
    assert len(lines) == 2 and len(set(lines)) == 1 and "mnist's" in lines[0] and "not fashion_mnist's" in lines[0]
    assert "Traceback" not in proc.stderr and "epoch 1" not in proc.stdout + proc.stderr


def test_cifar10_end_to_end_two_ranks_model_small(mirror, workdir):
    url, md5, _ = mirror
    run_dir = workdir / "run"
    # Downloaded from the local mirror and checked against the synthetic tarball's MD5 (given as data.md5).
    proc = run_train(2, "model=small", "data=cifar10", f"data.mirrors=['{url}/good/']",
                     f"data.md5={{cifar-10-binary.tar.gz:{md5}}}", "trainer.epochs=1", "trainer.batch_size=50",
                     f"hydra.run.dir={run_dir}", "tracking.experiment=c", "tracking.plots=false", *QUIET,
                     cwd=workdir, timeout=300, env=train_env(DPCNN_DATA_DIR=workdir / "data"))
    check_ok(proc)
    assert (workdir / "data" / "cifar10" / "cifar-10-binary.tar.gz").is_file()
    cfg = yaml.safe_load(checkpoint.load(run_dir / "checkpoints").meta["config"])
    assert cfg["model"]["input_shape"] == [32, 32, 3] and cfg["data"]["class_names"] == CLASSES
    assert cfg["data"]["mean"] == [0.4914, 0.4822, 0.4465]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("c").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.input_shape"] == "[32, 32, 3]"
    assert run.data.tags["dpcnn.data.identity"] == "verified" and md5 in run.data.tags["dpcnn.data.files_md5"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"cifar10-train", "cifar10-test"}
    import mlflow

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 32, 32, 3)  # the served signature follows
    out = model.predict(np.zeros((2, 32, 32, 3), np.float32))
    assert list(out.columns[:2]) == ["label", "prob_0"] and len(out) == 2


# ------------------------------------------------------------------ your own arrays

def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_reads_nhw_and_nhwc_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 9, 7), dtype=np.uint8)
    path = save_npz(tmp_path / "a.npz", x_train=x, y_train=np.arange(30) % 3, x_test=x[:6], y_test=np.arange(6) % 3,
                    class_names=np.array(["a", "b", "c"]))
    data = load_data({"name": "npz", "path": str(path), "val_fraction": 0.2})
    assert data.input_shape == (9, 7, 1) and data.num_classes == 3 and data.class_names == ("a", "b", "c")
    assert data.identity.status == "own" and len(data.val[0]) == 6
    # Normalised with the training split's own statistics: mean ~0, std ~1 there.
    assert abs(float(data.train[0].mean())) < 1e-3 and abs(float(data.train[0].std()) - 1) < 1e-3
    rgb = rng.random((20, 5, 5, 3)).astype(np.float32)
    path = save_npz(tmp_path / "b.npz", x_train=rgb, y_train=np.arange(20) % 4, x_test=rgb[:4], y_test=np.arange(4))
    data = load_data({"name": "npz", "path": str(path), "normalize": False})
    assert data.num_classes == 4 and data.class_names == ("0", "1", "2", "3")
    np.testing.assert_array_equal(data.train[0], rgb)


GOOD = dict(x_train=np.zeros((4, 5, 5), np.uint8), y_train=np.arange(4), x_test=np.zeros((2, 5, 5), np.uint8),
            y_test=np.arange(2))


@pytest.mark.parametrize("change,needle", [
    ({"x_test": None}, "lacks x_test"),
    ({"x_train": np.zeros((4, 5), np.uint8)}, "x_train has shape (4, 5)"),
    ({"x_train": np.zeros((4, 3, 8, 8), np.uint8)}, "looks like NCHW"),
    ({"x_train": np.full((4, 5, 5), 2.0)}, "floats outside [0, 1]"),
    ({"x_train": np.full((4, 5, 5), 300)}, "integers in [300, 300]"),
    ({"x_train": np.zeros((4, 5, 5), bool)}, "dtype bool"),
    ({"y_train": np.arange(3)}, "3 labels for 4 images"),
    ({"y_train": np.array([0.0, 1, 2, 3])}, "give integer class labels"),
    ({"y_train": np.array([0, 1, 2, -1])}, "the label -1"),
    ({"x_test": np.zeros((2, 6, 5), np.uint8)}, "x_test's are (6, 5, 1)"),
    ({"class_names": np.array(["a", "b"])}, "label 3 outside 0..1"),
])
def test_npz_problems_are_one_line_errors(tmp_path, change, needle):
    arrays = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(DataError) as err:
        read_npz(save_npz(tmp_path / "d.npz", **arrays))
    assert_one_line(err, "d.npz", needle)
    with pytest.raises(ConfigError, match="data=npz reads data.path"):
        load_data({"name": "npz"})


def test_npz_end_to_end_two_ranks(workdir):
    rng = np.random.default_rng(1)
    y = np.arange(300) % 4
    x = rng.integers(0, 60, (300, 12, 12, 3), dtype=np.uint8)
    x[np.arange(300), 2 * y, 2 * y] = 255  # the class is where the bright pixel is
    save_npz(workdir / "mine.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    proc = run_train(2, "data=npz", f"data.path={workdir / 'mine.npz'}", "model=tiny", "trainer.epochs=2",
                     "trainer.batch_size=40", "tracking=none", f"hydra.run.dir={workdir / 'run'}", *QUIET, cwd=workdir)
    check_ok(proc)
    cfg = yaml.safe_load(checkpoint.load(workdir / "run" / "checkpoints").meta["config"])
    assert cfg["model"]["input_shape"] == [12, 12, 3] and cfg["data"]["num_classes"] == 4
    assert cfg["model"]["layers"][-1]["units"] == 4  # the head follows the data's 4 classes
    assert len(cfg["data"]["mean"]) == 3


# ------------------------------------------------------------------ your own images

def draw(path: Path, size: tuple[int, int], value: int, rgb: bool) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3) if rgb else (size[1], size[0]), value, np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, rgb: bool, per_class: int = 6, split: bool = False) -> Path:
    """Three classes (dark, mid, bright) of odd-sized PNG and JPEG images."""
    for c, (name, value) in enumerate([("dark", 20), ("mid", 128), ("bright", 235)]):
        for i in range(per_class):
            part = ("train/" if i < per_class - 2 else "test/") if split else ""
            draw(root / f"{part}{name}/{i}.{'jpg' if i % 2 else 'png'}", (13 + i, 9 + c), value, rgb)
    return root


def test_image_folders_grey_and_rgb_resized_and_cached(tmp_path, monkeypatch):
    grey = load_data({"name": "image_folder", "path": str(image_folder(tmp_path / "g", rgb=False)),
                      "image_size": [8, 10], "channels": 1, "test_fraction": 0.25, "normalize": False})
    assert grey.input_shape == (8, 10, 1) and grey.class_names == ("bright", "dark", "mid")
    assert len(grey.train[1]) + len(grey.test[1]) == 18 and len(grey.test[1]) == round(0.25 * 18)
    for x, y in (grey.train, grey.test):  # every image is its class's grey level, resized
        np.testing.assert_allclose(x[..., 0].mean(axis=(1, 2)) * 255, np.array([235, 20, 128])[y], atol=1.5)
    rgb_root = image_folder(tmp_path / "c", rgb=True, split=True)
    cfg = {"name": "flowers", "format": "image_folder", "path": str(rgb_root), "image_size": [6, 6], "channels": 3}
    rgb = load_data(cfg)
    assert rgb.input_shape == (6, 6, 3) and len(rgb.train[1]) == 12 and len(rgb.test[1]) == 6
    assert rgb.identity.status == "own" and len(rgb.identity.md5) == 18
    cache = images.cache_path(rgb_root, (6, 6), 3)
    assert cache.parent == rgb_root.resolve() and cache.is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is fresh")

    monkeypatch.setattr(images, "decode", no_decoding)
    again = load_data(cfg)  # the cache is used
    np.testing.assert_array_equal(again.train[0], rgb.train[0])
    monkeypatch.undo()
    draw(rgb_root / "train/dark/0.png", (7, 7), 90, rgb=True)  # a file changes: the cache is rebuilt
    changed = load_data(cfg)
    assert not np.array_equal(changed.train[0], rgb.train[0]) and changed.identity.digest != rgb.identity.digest


def test_unreadable_images_are_listed_in_one_error(tmp_path):
    root = image_folder(tmp_path / "f", rgb=False)
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (root / "mid" / "0.png").read_bytes()
    (root / "mid" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as err:
        load_data({"name": "image_folder", "path": str(root), "image_size": [8, 8], "channels": 1,
                   "test_fraction": 0.2})
    assert_one_line(err, "2 of the 20 images", "dark/broken.png", "mid/cut.png", "fix or remove them")
    with pytest.raises(ConfigError, match="set data.test_fraction"):
        load_data({"name": "image_folder", "path": str(image_folder(tmp_path / "h", rgb=False)),
                   "image_size": [8, 8], "channels": 1})


def test_image_folder_end_to_end_two_ranks_and_its_cache(workdir):
    root = image_folder(workdir / "pics", rgb=True, per_class=12)  # odd sizes, PNG and JPEG
    args = ["data=image_folder", f"data.path={root}", "data.image_size=[10,10]", "model=tiny", "trainer.epochs=1",
            "trainer.batch_size=8", "tracking=none", *QUIET]

    def run(name, *extra, **kwargs):
        proc = run_train(2, *args, *extra, f"hydra.run.dir={workdir / name}", cwd=workdir, **kwargs)
        return proc, proc.stdout + proc.stderr

    first, log = run("rgb")
    check_ok(first)
    assert "decoded 36 images of 3 classes" in log and "(36 resized to 10x10)" in log
    second, log = run("rgb-again")
    check_ok(second)
    assert "decoded" not in log  # the cache rank 0 of the first run wrote
    cfg = yaml.safe_load(checkpoint.load(workdir / "rgb-again" / "checkpoints").meta["config"])
    assert cfg["model"]["input_shape"] == [10, 10, 3] and cfg["data"]["class_names"] == ["bright", "dark", "mid"]
    grey, log = run("grey", "data.channels=1")  # the same folder in grey: its own cache
    check_ok(grey)
    assert "decoded 36 images" in log
    assert yaml.safe_load(checkpoint.load(workdir / "grey" / "checkpoints").meta["config"])["model"]["input_shape"] \
        == [10, 10, 1]
    (root / "mid" / "2.png").write_bytes(b"garbage")  # a corrupt PNG: one line on every rank, exit 2
    bad, _ = run("bad", timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("1 of the 36 images in") == 2, bad.stderr
    assert "mid/2.png" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ predict resizes

def test_predict_resizes_other_images_with_a_warning(tmp_path, capsys):
    big = draw(tmp_path / "big.png", (40, 30), 200, rgb=True)
    x, sources, inverted = load_images([big], (32, 32, 3))
    assert x.shape == (1, 32, 32, 3) and inverted == 0 and np.all(x == 200)
    assert "1 of 1 image(s) resized to the model's 32x32 pixels" in capsys.readouterr().err
    needs_data()
    digits, _, _ = load_images([MNIST_5K / "t10k-images-idx3-ubyte.gz"], (32, 32, 3))
    assert digits.shape == (10000, 32, 32, 3) and digits.dtype == np.uint8
    assert "converted to the model's 32x32x3" in capsys.readouterr().err
