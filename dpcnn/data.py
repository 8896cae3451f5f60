"""Datasets: the registry, loading and normalisation, the epoch sampler and augmentation.

Everything a rank needs to turn "mnist" into arrays and global batches into
its own share, with no MPI in sight (``train.py`` decides who downloads and
when the others wait):

* ``DATASETS``        the registry: file names, checksums, mirrors, mean/std
* ``load_dataset``    -> ``Splits`` of float32 ``(n, h, w, 1)`` images and int64 labels
* ``EpochSampler``    the same global batches on every rank; ``shard`` cuts a rank's slice
* ``shift_offsets``, ``random_shift``  random translations, decided per global batch

Reading, finding, checking and downloading the files is ``dpcnn.idx``
(``read_idx``, ``ensure_files``, ...). Nothing here depends on the rank or
the world size, which is what lets training on 1, 2 or 4 ranks produce the
same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError

# find_files and ensure_files are re-exported: train.py imports them from here.
from .idx import _REFETCH, FILE_KEYS, DatasetSpec, ensure_files, find_files, read_idx  # noqa: F401

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
        mean=0.1307, std=0.3081),
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
        mean=0.2860, std=0.3530),
}


def get_spec(cfg: Mapping | DatasetSpec | str) -> DatasetSpec:
    """Build a DatasetSpec from a registered name or a data config (``name`` plus optional overrides).

    A known name starts from the registry entry; any of files, md5, raw_md5,
    mirrors, mean, std, num_classes given (not null) replaces that field. A
    new dataset in the same format is a config entry with at least ``files``.
    """
    if isinstance(cfg, DatasetSpec):
        return cfg
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    name = cfg.get("name")
    if not name:
        raise ConfigError("data.name is not set; choose data=mnist or data=fashion_mnist, "
                          "or give data.name and data.files")
    name = str(name)
    if name.replace("-", "_") in DATASETS:  # "fashion-mnist" as the folder is named
        name = name.replace("-", "_")
    given = {k: cfg.get(k) for k in ("files", "md5", "raw_md5", "mirrors", "mean", "std", "num_classes")}
    given = {k: v for k, v in given.items() if v is not None}
    for k in ("files", "md5", "raw_md5"):
        if k in given:
            given[k] = {str(a): str(b) for a, b in dict(given[k]).items()}
    if "mirrors" in given:
        m = given["mirrors"]
        given["mirrors"] = (str(m),) if isinstance(m, str) else tuple(str(u) for u in m)
    for k, cast in (("mean", float), ("std", float), ("num_classes", int)):
        if k in given:
            given[k] = cast(given[k])
    if name in DATASETS:
        spec = dataclasses.replace(DATASETS[name], **given)
    elif "files" in given:
        spec = DatasetSpec(name=name, **given)
    else:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)}); "
                        "fix data.name or give data.files/data.mirrors for a new dataset")
    missing = [k for k in FILE_KEYS if k not in spec.files]
    if missing:
        raise ConfigError(f"data.files for '{name}' lacks {', '.join(missing)}; "
                          f"give a file name for each of {', '.join(FILE_KEYS)}")
    if not spec.std > 0:
        raise ConfigError(f"data.std must be positive, got {spec.std}")
    return spec


# ------------------------------------------------------------------------ loading

@dataclass
class Splits:
    """Arrays ready to train on: x float32 ``(n, h, w, c)``, y int64 ``(n,)``.

    ``background`` is the value a 0 pixel has after normalisation (the fill
    for shifted-in pixels).
    """

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray] | None
    test: tuple[np.ndarray, np.ndarray]
    spec: DatasetSpec
    background: float = 0.0


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


def _to_float(raw: np.ndarray, mean: float, std: float, normalize: bool) -> np.ndarray:
    """uint8 ``raw`` -> float32 ``(raw/255 - mean)/std`` (or ``raw/255``), in one vectorised gather."""
    # Only 256 input values exist: compute each once in float64 and round once, so
    # every pixel is the correctly rounded result, in a single pass over the data.
    levels = np.arange(256) / 255.0
    lut = ((levels - mean) / std if normalize else levels).astype(np.float32)
    return lut[raw]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index arrays, each sorted, disjoint, covering 0..n-1."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    if n < 2:
        raise ConfigError(f"data.val_fraction={val_fraction} needs at least 2 training examples, have {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))  # both parts non-empty
    # A tag in the seed keeps this stream apart from the sampler's default_rng([seed, epoch]).
    perm = np.random.default_rng([seed, 0x56414C]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_dataset(cfg_or_spec: Mapping | DatasetSpec, root=None, *, train_subset: int | None = None,
                 val_fraction: float = 0.0, val_seed: int = 0, download: bool = True,
                 verify_checksum: bool = False, normalize: bool = True, progress: bool = True,
                 timeout: float = 30.0) -> Splits:
    """Find (or download) a dataset and return its train/val/test arrays.

    ``train_subset`` keeps the first N training examples; ``val_fraction`` then
    carves a validation split out of them with a seeded permutation, the same
    on every rank and every run. Images are float32 ``(n, h, w, 1)``: scaled
    to [0, 1], then ``(x - mean) / std`` unless ``normalize=False``.
    """
    spec = get_spec(cfg_or_spec)
    paths = ensure_files(spec, root, download=download, verify_checksum=verify_checksum,
                         progress=progress, timeout=timeout)
    arrays = {}
    for part in ("train", "test"):
        images = _images(paths[f"{part}_images"])
        labels = _labels(paths[f"{part}_labels"], images.shape[0], spec.num_classes)
        arrays[part] = (images, labels)
    (x_raw, y), n = arrays["train"], arrays["train"][1].shape[0]
    if train_subset is not None:
        if not 0 < train_subset:
            raise ConfigError(f"data.train_subset must be a positive number of examples or null, got {train_subset}")
        n = min(n, int(train_subset))
        x_raw, y = x_raw[:n], y[:n]
    train_idx, val_idx = split_indices(n, val_fraction, val_seed)
    x = _to_float(x_raw, spec.mean, spec.std, normalize)
    if len(val_idx):
        train, val = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
    else:
        train, val = (x, y), None
    test = (_to_float(arrays["test"][0], spec.mean, spec.std, normalize), arrays["test"][1])
    background = float(np.float32(-spec.mean / spec.std)) if normalize else 0.0
    return Splits(train=train, val=val, test=test, spec=spec, background=background)


def load_data(cfg: Mapping, root=None) -> Splits:
    """``load_dataset`` driven by the Hydra ``data`` config group; unknown keys are ignored."""
    get = cfg.get
    return load_dataset(
        cfg, root=root if root not in (None, "") else get("root"),
        train_subset=get("train_subset"), val_fraction=float(get("val_fraction") or 0.0),
        val_seed=int(get("val_seed") or 0), download=bool(get("download", True)),
        verify_checksum=bool(get("verify_checksum", False)), normalize=bool(get("normalize", True)),
        progress=bool(get("progress", True)), timeout=float(get("timeout") or 30.0))


# ------------------------------------------------------------------------ sampler

class EpochSampler:
    """Global batches of example indices, identical on every rank.

    Epoch e visits ``default_rng([seed, e]).permutation(n)`` in slices of
    ``batch_size``; global batch k is the k-th slice. Each rank then takes its
    contiguous ``shard`` of that batch, so the global batch, and therefore the
    averaged gradient, does not depend on the number of ranks.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if n < 0 or batch_size < 1:
            raise ConfigError(f"sampler needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self._cache: tuple[int, np.ndarray] | None = None  # permutation of the current epoch

    @property
    def num_batches(self) -> int:
        whole, rest = divmod(self.n, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all n examples in ``epoch``: int64 ``(n,)``."""
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            order.flags.writeable = False  # shared by every batch() of the epoch: keep it intact
            self._cache = (epoch, order)
        return self._cache[1]

    def batch(self, epoch: int, k: int) -> np.ndarray:
        """Global indices of batch k of ``epoch``: ``(batch_size,)``, or shorter for the last one."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range 0..{self.num_batches - 1}")
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    @staticmethod
    def shard(global_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """Rank r's contiguous part of a global batch (np.array_split: sizes differ by at most one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        start = EpochSampler.shard_start(len(global_indices), rank, world_size)
        return global_indices[start:EpochSampler.shard_start(len(global_indices), rank + 1, world_size)]

    @staticmethod
    def shard_start(batch_size: int, rank: int, world_size: int) -> int:
        """Where rank r's shard starts in a global batch of ``batch_size`` (rank = world_size: the end)."""
        base, extra = divmod(batch_size, world_size)
        return rank * base + min(rank, extra)

    def local_batches(self, epoch: int, rank: int, world_size: int, start: int = 0
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(k, global_batch_size, local_indices)`` for k = start, ..., num_batches - 1."""
        for k in range(start, self.num_batches):
            indices = self.batch(epoch, k)
            yield k, len(indices), self.shard(indices, rank, world_size)


# ------------------------------------------------------------------- augmentation

def shift_offsets(seed: int, epoch: int, step: int, n: int, max_shift: int) -> np.ndarray:
    """Random ``(dy, dx)`` per example of global batch ``step``: int64 ``(n, 2)`` in [-max_shift, max_shift].

    Drawn for the whole global batch, so rank r uses the rows of its shard and
    the augmentation does not depend on the world size.
    """
    # The trailing tag keeps these draws apart from the sampler's stream: SeedSequence
    # pads with zeros, so [seed, epoch, 0] alone would equal the sampler's [seed, epoch].
    rng = np.random.default_rng([seed, epoch, step, 0x5348])
    return rng.integers(-max_shift, max_shift + 1, size=(n, 2))


def random_shift(x: np.ndarray, offsets: np.ndarray, fill: float | None = None) -> np.ndarray:
    """Translate each image of ``x`` ``(n, h, w, c)`` by its ``offsets[i] = (dy, dx)``.

    ``out[i, y, x] = x[i, y - dy, x - dx]``: positive dy moves content down,
    positive dx right. Pixels shifted in take ``fill``; by default each
    image's minimum, which for MNIST-like data is the normalised 0 pixel (pass
    ``Splits.background`` to be explicit). Returns a new array of x's dtype.
    """
    n, h, w, _ = x.shape
    dy, dx = offsets[:, 0:1], offsets[:, 1:2]                      # (n, 1)
    rows, cols = np.arange(h) - dy, np.arange(w) - dx               # source row/col: (n, h), (n, w)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    # One gather for all images: clipped indices read some valid pixel, then the mask overwrites them.
    out = x[np.arange(n)[:, None, None], np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
    if fill is None:
        fill_values = x.min(axis=(1, 2, 3), keepdims=True)
    else:
        fill_values = np.asarray(fill, dtype=x.dtype)
    return np.where(inside[..., None], out, fill_values).astype(x.dtype, copy=False)
