"""Datasets: the registry, preparing and identifying the files, loading and normalisation.

Everything a rank needs to turn ``data=mnist`` (or ``cifar10``, an ``.npz``, an
image folder) into arrays, with no MPI in sight (``train.py`` decides who
prepares the files and when the others wait):

* ``DATASETS``        the registry: format, file names, checksums, mirrors, mean/std, classes
* ``prepare``         find or download the files, or decode an image folder into its cache; identify them
* ``load_data``       -> ``Splits`` of float32 ``(n, h, w, c)`` images and int64 labels
* ``fit_config``      write what the data decides (input shape, classes, normalisation) into the config

Reading, finding, checking and downloading IDX files is ``dpcnn.idx``; the
other formats are ``dpcnn.readers`` (CIFAR-10, ``.npz``) and ``dpcnn.images``
(image folders); ``dpcnn.identify`` says which bytes they are; the sampler and
the augmentation are ``dpcnn.sampler`` (re-exported here). Nothing here
depends on the rank or the world size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, DataError
from .identify import Identity, identify, own_identity

# find_files, read_idx and the sampler's names are re-exported: other modules, tests and benches import them here.
from .idx import FILE_KEYS, DatasetSpec, ensure_files, file_md5, find_files, read_idx  # noqa: F401
from .images import load_image_folder
from .readers import image_folder_shape, read_arrays, read_npz, user_path
from .sampler import (Augment, EpochSampler, flip_mask, random_flip, random_shift, shift_offsets,  # noqa: F401
                      split_indices)

log = logging.getLogger("dpcnn")

# ---------------------------------------------------------------------- registry

_MNIST_LAYOUT = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}

DATASETS = {
    "mnist": DatasetSpec(
        name="mnist", files=dict(_MNIST_LAYOUT),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        raw_md5={"train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
                 "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
                 "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
                 "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637"},
        # torchvision's mirror, then TensorFlow Datasets' (also JAX's examples), then the original site.
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        mean=0.1307, std=0.3081, class_names=tuple(str(i) for i in range(10)), shape=(28, 28, 1)),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist", files=dict(_MNIST_LAYOUT),
        # Zalando's published .gz checksums (also torchvision's). Repackaged copies such as
        # Debian's dataset-fashion-mnist are recompressed: other .gz md5, same raw_md5.
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        raw_md5={"train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                 "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
                 "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
                 "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965"},
        # The official site (torchvision's only mirror), then the dataset's own repository.
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        mean=0.2860, std=0.3530, shape=(28, 28, 1),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot")),
    "cifar10": DatasetSpec(
        name="cifar10", format="cifar10", files={"archive": "cifar-10-binary.tar.gz"},
        alternatives={"archive": ("cifar-10-batches-bin",)},  # the tarball, or the folder it extracts to
        # The tarball's MD5 as published on the CIFAR page, and the MD5s of its six extracted batches.
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
             "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
             "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
             "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
             "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
             "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
             "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d"},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        # Per-channel mean and standard deviation of the 50,000 training images' [0, 1] pixels.
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), shape=(32, 32, 3),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    # The user's own data, at data.path: no files, checksums or mirrors; statistics from the training split.
    "npz": DatasetSpec(name="npz", format="npz", files={}),
    "image_folder": DatasetSpec(name="image_folder", format="image_folder", files={}),
}


#: The files each format needs (``DatasetSpec.files`` keys); npz and image folders read ``data.path``.
FORMAT_FILES = {"idx": FILE_KEYS, "cifar10": ("archive",), "npz": (), "image_folder": ()}
_OWN = ("npz", "image_folder")


def get_spec(cfg: Mapping | DatasetSpec | str) -> DatasetSpec:
    """Build a DatasetSpec from a registered name or a data config (``name`` plus optional overrides).

    A known name starts from the registry entry; any of files, md5, raw_md5,
    mirrors, mean, std, num_classes, class_names, format given (not null, not
    empty) replaces that field. A new dataset in IDX format is a config entry
    with at least ``files``; any name with ``format: npz`` or ``image_folder``
    reads ``data.path``.
    """
    if isinstance(cfg, DatasetSpec):
        return cfg
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    name = cfg.get("name")
    if not name:
        raise ConfigError("data.name is not set; choose data=mnist, data=cifar10, data=npz, data=image_folder ..., "
                          "or give data.name and data.files")
    name = str(name)
    if name.replace("-", "_") in DATASETS:  # "fashion-mnist" as the folder is named
        name = name.replace("-", "_")
    keys = ("files", "md5", "raw_md5", "mirrors", "mean", "std", "num_classes", "class_names", "format")
    given = {k: v for k, v in ((k, cfg.get(k)) for k in keys) if v is not None and (v or k == "num_classes")}
    for k in ("files", "md5", "raw_md5"):
        if k in given:
            if not isinstance(given[k], Mapping):
                raise ConfigError(f"data.{k} must map file names to values, got {given[k]!r}; "
                                  f"e.g. data.{k}={{train-images-idx3-ubyte.gz:...}}")
            given[k] = {str(a): str(b) for a, b in dict(given[k]).items()}
    for k in ("mirrors", "class_names"):
        if k in given:
            given[k] = (str(given[k]),) if isinstance(given[k], str) else tuple(str(u) for u in given[k])
    for k in ("mean", "std"):
        if k in given:
            v = given[k]
            given[k] = float(v) if isinstance(v, (int, float)) else tuple(float(u) for u in v)
    if "num_classes" in given:
        given["num_classes"] = int(given["num_classes"])
    fmt = str(given.get("format") or (DATASETS[name].format if name in DATASETS else "idx"))
    if fmt not in FORMAT_FILES:
        raise ConfigError(f"data.format must be one of {', '.join(FORMAT_FILES)}, got {fmt!r}")
    if name in DATASETS:
        spec = dataclasses.replace(DATASETS[name], **given)
    elif "files" in given or fmt in _OWN:
        spec = DatasetSpec(name=name, **{"files": {}, **given})
    else:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)}); "
                        "fix data.name or give data.files/data.mirrors for a new dataset")
    missing = [k for k in FORMAT_FILES[spec.format] if k not in spec.files]
    if missing:
        raise ConfigError(f"data.files for '{name}' lacks {', '.join(missing)}; "
                          f"give a file name for each of {', '.join(FORMAT_FILES[spec.format])}")
    if not np.all(np.asarray(spec.std) > 0):
        raise ConfigError(f"data.std must be positive, got {spec.std}")
    return spec


def input_hint(cfg: Mapping) -> tuple[int, int, int] | None:
    """One example's ``(h, w, c)`` when the config alone fixes it (registered datasets, image folders)."""
    spec = get_spec(cfg)
    if spec.format == "image_folder" and cfg.get("image_size") and cfg.get("channels"):
        return (*(int(s) for s in cfg["image_size"]), int(cfg["channels"]))
    return tuple(spec.shape) if spec.shape else None


# ------------------------------------------------------------------------ loading

@dataclass
class Splits:
    """Arrays ready to train on: x float32 ``(n, h, w, c)``, y int64 ``(n,)``, and what the data says.

    ``mean``/``std`` are the normalisation applied to [0, 1] pixels (one value,
    or one per channel); ``background`` is the value a 0 pixel has after it
    (the fill for shifted-in pixels). ``identity`` says which files these are
    (set by `prepare`); ``source`` is where they were read from.
    """

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray] | None
    test: tuple[np.ndarray, np.ndarray]
    spec: DatasetSpec
    background: float | np.ndarray = 0.0
    num_classes: int = 10
    class_names: tuple = ()
    mean: float | tuple = 0.0
    std: float | tuple = 1.0
    identity: Identity | None = None
    source: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train[0].shape[1:])


def _per_channel(value, channels: int, key: str) -> np.ndarray:
    """A mean or std as float64 ``(channels,)``: one number for all, or one per channel."""
    v = np.asarray(value, np.float64).reshape(-1)
    if v.size not in (1, channels):
        raise ConfigError(f"data.{key} has {v.size} values for images of {channels} channel(s); "
                          f"give one, or one per channel")
    return np.broadcast_to(v, (channels,))


def _to_float(raw: np.ndarray, mean, std, normalize: bool) -> np.ndarray:
    """uint8 (or [0, 1] float) ``raw`` -> float32 ``(raw/255 - mean)/std`` (or ``raw/255``), per channel.

    uint8: only 256 input values exist, so each is computed once per channel in
    float64 and rounded once (every pixel correctly rounded), then one
    vectorised gather per channel.
    """
    channels = raw.shape[-1]
    mean, std = (_per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")) if normalize \
        else (np.zeros(channels), np.ones(channels))
    if raw.dtype != np.uint8:  # [0, 1] floats (an .npz)
        return (raw.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    luts = ((np.arange(256)[:, None] / 255.0 - mean) / std).astype(np.float32)  # (256, channels)
    if np.all(luts == luts[:, :1]):
        return luts[:, 0][raw]
    out = np.empty(raw.shape, np.float32)
    for c in range(channels):
        out[..., c] = luts[:, c][raw[..., c]]
    return out


def channel_stats(x: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel (mean, std) of [0, 1] pixels (uint8 counted exactly with one histogram per channel)."""
    means, stds = [], []
    for c in range(x.shape[-1]):
        if x.dtype == np.uint8:
            counts = np.bincount(x[..., c].reshape(-1), minlength=256)
            levels = np.arange(256) / 255.0
            mean = counts @ levels / counts.sum()
            var = counts @ (levels - mean) ** 2 / counts.sum()
        else:
            mean, var = float(x[..., c].mean(dtype=np.float64)), float(x[..., c].var(dtype=np.float64))
        means.append(round(float(mean), 6))
        stds.append(round(max(float(np.sqrt(var)), 1e-6), 6))
    return tuple(means), tuple(stds)


def load_dataset(cfg_or_spec: Mapping | DatasetSpec, root=None, *, train_subset: int | None = None,
                 val_fraction: float = 0.0, val_seed: int = 0, download: bool = True,
                 verify_checksum: bool = False, normalize: bool = True, progress: bool = True,
                 timeout: float = 30.0, identity: Identity | None = None) -> Splits:
    """Find (or download, or decode) a dataset and return its train/val/test arrays.

    ``train_subset`` keeps the first N training examples; ``val_fraction`` then
    carves a validation split out of them with a seeded permutation, the same
    on every rank and every run. Images are float32 ``(n, h, w, c)``: scaled
    to [0, 1], then ``(x - mean) / std`` per channel unless ``normalize=False``;
    the user's own data is normalised with its training split's statistics
    unless ``data.mean``/``data.std`` are given.
    """
    spec = get_spec(cfg_or_spec)
    opts = cfg_or_spec if isinstance(cfg_or_spec, Mapping) else {}
    x_raw, y, x_test, y_test, names, k, source = read_arrays(spec, opts, root, download, verify_checksum, progress,
                                                             timeout)
    n = len(y)
    if train_subset is not None:
        if not 0 < train_subset:
            raise ConfigError(f"data.train_subset must be a positive number of examples or null, got {train_subset}")
        n = min(n, int(train_subset))
        x_raw, y = x_raw[:n], y[:n]
    train_idx, val_idx = split_indices(n, val_fraction, val_seed)
    mean, std = spec.mean, spec.std
    if spec.format in _OWN:  # the user's data: its training split's statistics, unless data.mean/std are given
        stats = dict(zip(("mean", "std"), channel_stats(x_raw[train_idx])))
        mean, std = (getattr(spec, key) if opts.get(key) is not None else stats[key] for key in ("mean", "std"))
    if not normalize:
        mean, std = 0.0, 1.0
    x = _to_float(x_raw, mean, std, normalize)
    train, val = ((x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])) if len(val_idx) else ((x, y), None)
    channels = x.shape[-1]
    background = -_per_channel(mean, channels, "mean") / _per_channel(std, channels, "std")
    background = float(np.float32(background[0])) if np.all(background == background[0]) \
        else background.astype(np.float32)
    names = tuple(opts.get("class_names") or ()) or names or spec.class_names
    names = tuple(str(c) for c in names) if len(names) == k else tuple(str(i) for i in range(k))
    return Splits(train=train, val=val, test=(_to_float(x_test, mean, std, normalize), y_test), spec=spec,
                  background=background, num_classes=k, class_names=names, mean=mean, std=std, identity=identity,
                  source=source)


def _options(cfg: Mapping, root=None) -> dict:
    get = cfg.get
    return dict(root=root if root not in (None, "") else get("root"), download=bool(get("download", True)),
                progress=bool(get("progress", True)), timeout=float(get("timeout") or 30.0))


def prepare(cfg: Mapping, root=None) -> Identity:
    """Make the data readable and say what it is; run by ONE process (rank 0) before any reads it.

    Registered and IDX datasets: find the files or download them (MD5-checked),
    then identify them (`dpcnn.identify`: another dataset's files are an error,
    unknown ones a warning). npz: hash the file. Image folders: decode them into
    their cache if it is missing or stale.
    """
    spec, o = get_spec(cfg), _options(cfg, root)
    if spec.format == "npz":
        path = user_path(cfg, spec)
        if not path.is_file():
            read_npz(path)  # its one-line error
        return own_identity(spec.name, {path.name: file_md5(path)})
    if spec.format == "image_folder":
        return own_identity(spec.name, load_image_folder(user_path(cfg, spec), *image_folder_shape(cfg))[-1])
    paths = ensure_files(spec, o["root"], download=o["download"], progress=o["progress"], timeout=o["timeout"])
    return identify(spec, paths, DATASETS, strict=bool(cfg.get("verify_checksum", False)))


def load_data(cfg: Mapping, root=None, identity: Identity | None = None) -> Splits:
    """``load_dataset`` driven by the Hydra ``data`` config group; unknown keys are ignored.

    Without ``identity`` (standalone use) it `prepare`s the data first; with it
    (rank 0 prepared it) nothing is downloaded or decoded here.
    """
    get = cfg.get
    if identity is None:
        identity = prepare(cfg, root)
    o = _options(cfg, root)
    return load_dataset(
        cfg, root=o["root"], train_subset=get("train_subset"), val_fraction=float(get("val_fraction") or 0.0),
        val_seed=int(get("val_seed") or 0), download=False, normalize=bool(get("normalize", True)),
        progress=o["progress"], timeout=o["timeout"], identity=identity)


# ------------------------------------------------------------------ the data decides

def head_for(layers: list, num_classes: int) -> int | None:
    """Make the last layer, a dense classifier, output ``num_classes``; returns its old width if it changed."""
    last = layers[-1] if layers else None
    if last is None or last.get("type") != "dense" or last.get("units") == num_classes:
        return None
    old, last["units"] = last.get("units"), num_classes
    return old


def fit_config(cfg, data: Splits, announce: bool = False) -> None:
    """Write what the data decides into the composed config (a DictConfig): ``model.input_shape``,
    ``data.num_classes``, ``data.class_names``, ``data.mean``/``std`` and the width of the last dense layer.

    Checkpoints, MLflow parameters and the served model's spec are all made
    from the config, so they then describe the model that was trained. A
    ``model.input_shape`` given by hand that differs from the data's is an error.
    """
    shape = list(data.input_shape)
    given = cfg.model.get("input_shape")
    if given and [int(s) for s in given] != shape:
        raise ConfigError(f"model.input_shape={list(given)} but the {data.spec.name} images are {shape}; "
                          "leave model.input_shape=null to take the data's")
    cfg.model.input_shape = shape
    cfg.data.num_classes, cfg.data.class_names = data.num_classes, list(data.class_names)
    as_config = (lambda v: float(v) if np.ndim(v) == 0 else [float(u) for u in v])
    cfg.data.mean, cfg.data.std = as_config(data.mean), as_config(data.std)
    layers = cfg.model.layers
    old = head_for(layers, data.num_classes) if len(layers) else None
    if old is not None and announce:
        log.info("model: the last layer gets %d units, one per class of %s (the config said %s)",
                 data.num_classes, data.spec.name, old)
