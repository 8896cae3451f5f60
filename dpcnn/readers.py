"""Readers of every format: IDX sets, CIFAR-10's official binary batches, the user's ``.npz`` and image folders.

`read_arrays` reads a dataset in its spec's format. Each reader returns uint8
(or [0, 1] float) images ``(n, h, w, c)`` and int64 labels, or raises one
`DataError` line naming the file, what is wrong and the fix.

CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"):
``cifar-10-binary.tar.gz`` holds ``cifar-10-batches-bin/`` with
``data_batch_1.bin`` .. ``data_batch_5.bin`` (training), ``test_batch.bin`` and
``batches.meta.txt`` (the class names, one a line). Every record is 3073 bytes:
one label byte (0-9), then 3072 pixel bytes, the red, green and blue 32x32
planes in row-major order (CHW). The tarball is read as it is, never
extracted; an already extracted ``cifar-10-batches-bin/`` folder reads too.
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .images import load_image_folder
from .idx import _REFETCH, DatasetSpec, _one_line, ensure_files, read_idx
from .sampler import split_indices

CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST, CIFAR_META = "test_batch.bin", "batches.meta.txt"
CIFAR_SIDE, CIFAR_RECORD = 32, 1 + 3 * 32 * 32


def _cifar_members(path: Path) -> dict[str, bytes]:
    """{file name: bytes} of the batches and the meta file, from the tarball or an extracted folder."""
    wanted = {*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META}
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir() if p.name in wanted and p.is_file()}
    members = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                name = info.name.rsplit("/", 1)[-1]
                if info.isfile() and name in wanted:
                    members[name] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: truncated or corrupt archive ({_one_line(e)}); {_REFETCH}") from e
    return members


def _cifar_records(blob: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 NHWC images ``(n, 32, 32, 3)`` (a strided view) and int64 labels."""
    if not blob or len(blob) % CIFAR_RECORD:
        raise DataError(f"{where}: {len(blob)} bytes is not a whole number of {CIFAR_RECORD}-byte records "
                        f"(1 label byte + 3072 pixel bytes); {_REFETCH}")
    records = np.frombuffer(blob, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(f"{where}: label {labels.max()} outside 0..{num_classes - 1}; {_REFETCH}")
    return records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1), labels


def read_cifar10(path: str | Path, num_classes: int = 10):
    """``(x_train, y_train, x_test, y_test, class names)`` of the binary CIFAR-10 at ``path``.

    ``path`` is ``cifar-10-binary.tar.gz`` (read in place) or the extracted
    ``cifar-10-batches-bin/`` folder; images come back uint8 NHWC.
    """
    path = Path(path)
    members = _cifar_members(path)
    missing = [n for n in (*CIFAR_TRAIN, CIFAR_TEST) if n not in members]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} in it; it is not the binary CIFAR-10 "
                        f"(cifar-10-binary.tar.gz); {_REFETCH}")
    train = [_cifar_records(members[n], f"{path}:{n}", num_classes) for n in CIFAR_TRAIN]
    x_test, y_test = _cifar_records(members[CIFAR_TEST], f"{path}:{CIFAR_TEST}", num_classes)
    names = members.get(CIFAR_META, b"").decode("ascii", "replace").split("\n")
    names = tuple(n.strip() for n in names if n.strip())
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            np.ascontiguousarray(x_test), y_test, names if len(names) == num_classes else ())


# ------------------------------------------------------------------------- npz

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_FIX = "data.path must be an .npz with x_train, y_train, x_test, y_test (np.savez)"


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """uint8 (or [0, 1] float32) ``(n, h, w, c)`` from NHWC or NHW pixels, or one line saying what is wrong."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not x.shape[0]:
        raise DataError(f"{path}: {key} has shape {x.shape}; give images as (n, h, w) or (n, h, w, c), n >= 1")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        raise DataError(f"{path}: {key} has shape {x.shape}, which looks like NCHW; dpcnn takes NHWC: "
                        f"np.transpose({key}, (0, 2, 3, 1))")
    if x.dtype.kind in "ui":
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{path}: {key} holds integers in [{x.min()}, {x.max()}]; give pixels 0..255 as uint8")
        return x.astype(np.uint8, copy=False)
    if x.dtype.kind != "f":
        raise DataError(f"{path}: {key} has dtype {x.dtype}; give uint8 pixels 0..255 or floats in [0, 1]")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{path}: {key} holds floats outside [0, 1] (min {np.nanmin(x):g}, max {np.nanmax(x):g}); "
                        "give pixels scaled to [0, 1] (x / 255) or uint8 0..255")
    return x.astype(np.float32, copy=False)


def _npz_labels(y: np.ndarray, n: int, key: str, path: Path) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {y.dtype} and shape {y.shape}; give integer class labels, shape (n,)")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels for {n} images")
    if y.min() < 0:
        raise DataError(f"{path}: {key} holds the label {y.min()}; labels are 0 .. number of classes - 1")
    return y.astype(np.int64)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz (no pickles), after checking it has the four a dataset needs."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
            raise DataError(f"{path}: lacks {', '.join(missing)} (it has {', '.join(z.files) or 'nothing'}); "
                            f"{_NPZ_FIX}")
        return {k: z[k] for k in z.files}


def read_npz(path: str | Path, num_classes: int | None = None):
    """``(x_train, y_train, x_test, y_test, class names, number of classes)`` of the user's ``.npz``.

    Class names come from an optional ``class_names`` array of strings; the
    number of classes is ``num_classes`` if given, else the number of names,
    else the largest label + 1. Every problem is one `DataError` line.
    """
    path = Path(path)
    try:
        arrays = _npz_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "no such file" if not path.exists() else f"not a readable .npz ({_one_line(e)})"
        raise DataError(f"{path}: {why}; {_NPZ_FIX}") from None
    x_train, x_test = (_npz_images(arrays[k], k, path) for k in ("x_train", "x_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} but x_test's are {x_test.shape[1:]}")
    y_train = _npz_labels(arrays["y_train"], len(x_train), "y_train", path)
    y_test = _npz_labels(arrays["y_test"], len(x_test), "y_test", path)
    names = tuple(str(n) for n in arrays.get("class_names", np.array([], str)).reshape(-1))
    k = int(num_classes or len(names) or max(y_train.max(), y_test.max()) + 1)
    if names and len(names) != k:
        raise DataError(f"{path}: {len(names)} class_names for {k} classes (data.num_classes)")
    top = max(y_train.max(), y_test.max())
    if top >= k:
        raise DataError(f"{path}: label {top} outside 0..{k - 1}; fix the labels or data.num_classes")
    return x_train, y_train, x_test, y_test, names, k


# ----------------------------------------------------------------- IDX sets, dispatch

def _images(path: Path) -> np.ndarray:
    raw = read_idx(path)
    if raw.dtype != np.uint8 or raw.ndim not in (3, 4):
        raise DataError(f"{path}: expected uint8 images of shape (n, h, w) or (n, h, w, c), "
                        f"got {raw.dtype} {raw.shape}; point data.files.*_images at an image file")
    return raw if raw.ndim == 4 else raw[..., None]


def _labels(path: Path, n_images: int, num_classes: int) -> np.ndarray:
    raw = read_idx(path)
    if raw.ndim != 1 or raw.dtype.kind not in "iu":
        raise DataError(f"{path}: expected a 1-D integer label file, got {raw.dtype} {raw.shape}; "
                        "point data.files.*_labels at a label file")
    if raw.shape[0] != n_images:
        raise DataError(f"{path}: {raw.shape[0]} labels for {n_images} images; the image and label files "
                        f"belong to different sets, {_REFETCH}")
    if raw.size and (raw.min() < 0 or raw.max() >= num_classes):
        bad = raw[(raw < 0) | (raw >= num_classes)][0]
        raise DataError(f"{path}: label {bad} outside 0..{num_classes - 1}; {_REFETCH}, "
                        "or set data.num_classes to the real number of classes")
    return raw.astype(np.int64)


def user_path(opts: Mapping, spec: DatasetSpec) -> Path:
    if not opts.get("path"):
        raise ConfigError(f"data={spec.format} reads data.path; give it, e.g. data.path=/path/to/"
                          f"{'data.npz' if spec.format == 'npz' else 'images'}")
    return Path(str(opts["path"])).expanduser()


def image_folder_shape(opts: Mapping) -> tuple[tuple[int, int], int]:
    """``((h, w), channels)`` of data=image_folder, checked."""
    size, channels = opts.get("image_size"), opts.get("channels")
    if not size or len(size) != 2 or min(int(s) for s in size) < 1 or channels not in (1, 3):
        raise ConfigError(f"data=image_folder needs data.image_size=[h,w] and data.channels=1|3, got {size} and "
                          f"{channels}; e.g. data.image_size=[32,32] data.channels=3")
    return (int(size[0]), int(size[1])), int(channels)


def _image_folder(opts: Mapping, spec: DatasetSpec, build: bool):
    """An image folder's (x_train, y_train, x_test, y_test, class names, number of classes)."""
    x, y, split, classes, _ = load_image_folder(user_path(opts, spec), *image_folder_shape(opts), build=build)
    if (split == 2).any():
        fraction = float(opts.get("test_fraction") or 0.0)
        if not 0 < fraction < 1:
            raise ConfigError(f"{opts['path']} has no train/ and test/ folders: set data.test_fraction (e.g. 0.2) to "
                              "hold out that share of the images as the test set")
        train_idx, test_idx = split_indices(len(y), fraction, int(opts.get("val_seed") or 0), tag=0x54455354)
    else:
        train_idx, test_idx = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
    if not len(test_idx):
        raise DataError(f"{opts['path']}: the test set is empty; put images in test/<class>/")
    given = opts.get("num_classes")
    if given is not None and int(given) != len(classes):
        raise ConfigError(f"data.num_classes={given} but {opts['path']} has {len(classes)} class folders")
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], tuple(classes), len(classes)


def read_arrays(spec: DatasetSpec, opts: Mapping, root, download: bool, verify_checksum: bool, progress: bool,
                timeout: float):
    """(x_train, y_train, x_test, y_test, class names, number of classes, source) in the spec's format."""
    if spec.format == "npz":
        path = user_path(opts, spec)
        return (*read_npz(path, opts.get("num_classes")), str(path.resolve()))
    if spec.format == "image_folder":
        return (*_image_folder(opts, spec, build=download), str(user_path(opts, spec).resolve()))
    paths = ensure_files(spec, root, download=download, verify_checksum=verify_checksum, progress=progress,
                         timeout=timeout)
    source = str(next(iter(paths.values())).resolve().parent)
    if spec.format == "cifar10":
        return (*read_cifar10(paths["archive"], spec.num_classes), spec.num_classes, source)
    arrays = []
    for part in ("train", "test"):
        images = _images(paths[f"{part}_images"])
        arrays += [images, _labels(paths[f"{part}_labels"], images.shape[0], spec.num_classes)]
    return (*arrays, (), spec.num_classes, source)
