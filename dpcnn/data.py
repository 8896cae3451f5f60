"""Datasets: IDX files, download, normalisation, the epoch sampler and augmentation.

Everything a rank needs to turn "mnist" into arrays and global batches into
its own share, with no MPI in sight (``train.py`` decides who downloads and
when the others wait):

* ``read_idx``        one IDX file (gzip or raw) -> ndarray, or one clear DataError line
* ``DATASETS``        the registry: file names, checksums, mirrors, mean/std
* ``ensure_files``    find the four files, or download them (checksummed, atomic)
* ``load_dataset``    -> ``Splits`` of float32 ``(n, h, w, 1)`` images and int64 labels
* ``EpochSampler``    the same global batches on every rank; ``shard`` cuts a rank's slice
* ``shift_offsets``, ``random_shift``  random translations, decided per global batch

Nothing here depends on the rank or the world size, which is what lets
training on 1, 2 or 4 ranks produce the same weights.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError

# --------------------------------------------------------------------------- IDX

# IDX type codes (http://yann.lecun.com/exdb/mnist/, bottom of the page); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_REFETCH = "delete it and run again to re-download, or point DPCNN_DATA_DIR at a good copy"
_ROOT_FIX = "set DPCNN_DATA_DIR (or data.root) to a folder holding them, e.g. DPCNN_DATA_DIR=/path/to/mnist"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw, into an array of its header's shape.

    Compression is decided by the gzip magic bytes (1f 8b), not the file name,
    so a file gunzipped in place still reads. The returned array is a
    read-only view of the decompressed bytes for single-byte types (copy it to
    write into it) and a native-endian copy otherwise. MNIST images come back
    as uint8 ``(n, 28, 28)``, labels as uint8 ``(n,)``.

    Raises DataError, with one line "<path>: <problem>; <fix>", for anything
    that is not a complete, well-formed IDX file.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an IDX file; "
                        "remove it, or point DPCNN_DATA_DIR at a folder holding the file")
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path, or run with data.download=true to fetch it")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; {_REFETCH}")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({_one_line(e.strerror or e)}); check its permissions") from e
    if not blob:
        raise DataError(f"{path}: the file is empty (an interrupted download?); {_REFETCH}")
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            raise DataError(f"{path}: truncated or corrupt gzip data ({_one_line(e)}); {_REFETCH}") from e
    return _parse_idx(blob, path)


def _parse_idx(blob: bytes, path: Path) -> np.ndarray:
    # Header: 0x00 0x00 <type code> <ndim>, then ndim big-endian uint32 sizes, then the values.
    if len(blob) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(blob)} bytes); {_REFETCH}")
    if blob[0] != 0 or blob[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic {blob[:4].hex()} should start with 0000); {_REFETCH}")
    code, ndim = blob[2], blob[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02x} (known: {known}); {_REFETCH}")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header gives {ndim} dimensions, expected 1 to 4; {_REFETCH}")
    start = 4 + 4 * ndim
    if len(blob) < start:
        raise DataError(f"{path}: truncated IDX header ({len(blob)} of {start} bytes); {_REFETCH}")
    shape = struct.unpack(f">{ndim}I", blob[4:start])
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected, actual = count * dtype.itemsize, len(blob) - start
    if actual < expected:
        raise DataError(f"{path}: truncated: header shape {shape} needs {expected} bytes of data "
                        f"but only {actual} follow; {_REFETCH}")
    if actual > expected:
        raise DataError(f"{path}: {actual - expected} trailing bytes after the {expected} bytes "
                        f"of shape {shape}; {_REFETCH}")
    array = np.frombuffer(blob, dtype=dtype, count=count, offset=start).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------- registry

FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_MNIST_LAYOUT = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's four IDX files come from and how to normalise them.

    ``files`` maps each of FILE_KEYS to a file name; ``md5`` maps file names to
    the MD5 of the file as served (the .gz); ``raw_md5`` optionally maps them to
    the MD5 of the decompressed bytes, so a recompressed or gunzipped copy of
    the same data still verifies. ``mean``/``std`` are of pixels scaled to [0, 1].
    """

    name: str
    files: dict
    md5: dict = field(default_factory=dict)
    mirrors: tuple = ()
    mean: float = 0.0
    std: float = 1.0
    num_classes: int = 10
    raw_md5: dict = field(default_factory=dict)


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


# ------------------------------------------------------------- finding, download

def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else $DPCNN_DATA_DIR, else a per-user cache."""
    if root not in (None, ""):
        return Path(root).expanduser()
    if os.environ.get("DPCNN_DATA_DIR"):
        return Path(os.environ["DPCNN_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dpcnn"


def search_dirs(spec: DatasetSpec, root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order: <root>/<name>, <root>/<name with - for _>, <root>."""
    root = resolve_root(root)
    dirs = [root / spec.name, root / spec.name.replace("_", "-"), root]
    return list(dict.fromkeys(dirs))


def find_files(spec: DatasetSpec, root=None) -> tuple[dict[str, Path], list[str]]:
    """Look for the four files: ``(found {key: path}, missing [key, ...])``.

    In each search folder a file also counts under its name without ".gz"
    (read_idx does not care). Anything at that path counts as found, even a
    directory, so that read_idx reports it instead of a download clobbering it.
    """
    dirs = search_dirs(spec, root)
    found, missing = {}, []
    for key in FILE_KEYS:
        fname = spec.files[key]
        names = list(dict.fromkeys([fname, fname.removesuffix(".gz")]))
        hit = next((d / n for d in dirs for n in names if (d / n).exists()), None)
        if hit is None:
            missing.append(key)
        else:
            found[key] = hit
    return found, missing


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(spec: DatasetSpec, key: str, path: Path) -> None:
    """Check ``path`` against the spec's MD5 of the served file, or of its decompressed bytes."""
    fname = spec.files[key]
    want, want_raw = spec.md5.get(fname), spec.raw_md5.get(fname)
    if want is None and want_raw is None:
        return  # a config-defined dataset without checksums: nothing to check against
    if not path.is_file():
        read_idx(path)  # raises its one-line error (a directory, say)
    actual = _md5(path)
    if actual == want:
        return
    expected, got = f"md5 {want}" if want else "", f"got {actual}"
    if want_raw is not None:
        blob = path.read_bytes()
        if blob[:2] == b"\x1f\x8b":
            try:
                blob = gzip.decompress(blob)
            except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
                pass  # corrupt: reported as a mismatch below
        actual_raw = hashlib.md5(blob).hexdigest()
        if actual_raw == want_raw:
            return
        expected = " or ".join(filter(None, [expected, f"decompressed md5 {want_raw}"]))
        got += f" (decompressed {actual_raw})"
    raise DataError(f"{path}: checksum mismatch (expected {expected}, {got}); {_REFETCH}")


def _download(url: str, dest: Path, md5: str | None, timeout: float, progress: bool) -> None:
    """Stream ``url`` to a temp file next to ``dest``, check it, rename it into place.

    The temp file lives in dest's folder so ``os.replace`` is an atomic rename:
    a crash or a second process never sees a half-written ``dest``.
    """
    from tqdm import tqdm  # only needed when downloading

    try:
        tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False)
    except OSError as e:  # our folder, not the mirror, is the problem: stop here
        raise DataError(f"{dest.parent}: cannot write the download there ({_one_line(e.strerror or e)}); "
                        f"{_ROOT_FIX}, or to a writable folder") from e
    try:
        with tmp, urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            digest, received = hashlib.md5(), 0
            with tqdm(total=length, unit="B", unit_scale=True, desc=dest.name, leave=False,
                      disable=None if progress else True) as bar:
                while chunk := response.read(1 << 16):
                    tmp.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # http.client returns b"" rather than raising when the server hangs up early.
        if length is not None and received != length:
            raise ConnectionError(f"connection closed after {received} of {length} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"md5 {digest.hexdigest()} != expected {md5}")
        os.replace(tmp.name, dest)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def _download_missing(spec: DatasetSpec, target: Path, missing: list[str], found: dict[str, Path],
                      progress: bool, timeout: float) -> list[str]:
    """Download each missing key into ``target``, updating ``found``/``missing``; return the failures."""
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{target}: cannot create the download folder ({_one_line(e.strerror or e)}); "
                        f"{_ROOT_FIX}, or to a writable folder") from e
    failures, unreachable = [], set()
    for key in list(missing):
        fname = spec.files[key]
        for mirror in spec.mirrors:
            if mirror in unreachable:
                continue
            url = mirror.rstrip("/") + "/" + fname
            try:
                _download(url, target / fname, spec.md5.get(fname), timeout, progress)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                # No connection at all (DNS, refused, connect timeout): skip this mirror for the
                # other files too, rather than wait out one timeout per file per mirror.
                if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
                    unreachable.add(mirror)
                    failures.append(f"{mirror}: {_one_line(e.reason)}")
                else:
                    failures.append(f"{url}: {_one_line(e) or type(e).__name__}")
                continue
            found[key] = target / fname
            missing.remove(key)
            break
    if missing and created:
        try:
            target.rmdir()  # leave no empty folder behind (only succeeds if empty)
        except OSError:
            pass
    return failures


def ensure_files(spec: DatasetSpec, root=None, download: bool = True, verify_checksum: bool = False,
                 progress: bool = True, timeout: float = 30.0) -> dict[str, Path]:
    """Return ``{key: path}`` of the four files, downloading the missing ones.

    Downloads go to <root>/<name>/, trying each mirror in turn (a failure,
    a dropped connection or a checksum mismatch moves on to the next). Files
    already on disk are checksummed only if ``verify_checksum``. Call this on
    one rank only; the others wait, then call it with ``download=False``.
    """
    root = resolve_root(root)
    found, missing = find_files(spec, root)
    if verify_checksum:
        for key, path in found.items():
            verify_file(spec, key, path)
    failures: list[str] = []
    if missing and download and spec.mirrors:
        failures = _download_missing(spec, root / spec.name, missing, found, progress, timeout)
    if missing:
        names = ", ".join(spec.files[k] for k in missing)
        searched = ", ".join(str(d) for d in search_dirs(spec, root))
        why = f"download failed ({'; '.join(failures)})" if failures else (
            "download disabled" if not download else "no mirrors configured")
        raise DataError(f"dataset '{spec.name}' is missing {names}: not in {searched}; {why}; {_ROOT_FIX}")
    return found


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
