"""Dataset files: reading IDX, finding the files, checksums, download with verification.

* ``read_idx``        one IDX file (gzip or raw) -> ndarray, or one clear DataError line
* ``DatasetSpec``     a dataset's identity: its format, file names, checksums, mirrors, mean/std, classes
* ``find_files``      where its files are (search folders under the data root)
* ``file_md5``, ``verify_file``  a file's MD5; a file against the MD5 of the served file, or of its decompressed bytes
* ``ensure_files``    find the files, or download them (checksummed, atomic)

The registry of known datasets (``DATASETS``, ``get_spec``) and what turns the
files into arrays live in ``dpcnn.data``, which imports this module (never the
other way round).
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

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
    if math.prod(d for d in shape if d) * dtype.itemsize > np.iinfo(np.intp).max:  # NumPy's limit, zeros or not
        raise DataError(f"{path}: header shape {shape} is too large for any array; {_REFETCH}")
    expected, actual = count * dtype.itemsize, len(blob) - start
    if actual < expected:
        raise DataError(f"{path}: truncated: header shape {shape} needs {expected} bytes of data "
                        f"but only {actual} follow; {_REFETCH}")
    if actual > expected:
        raise DataError(f"{path}: {actual - expected} trailing bytes after the {expected} bytes "
                        f"of shape {shape}; {_REFETCH}")
    array = np.frombuffer(blob, dtype=dtype, count=count, offset=start).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------- identity

FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files come from, what they are and how to normalise them.

    ``format`` says how the files are read: ``idx`` (``files`` maps each of
    FILE_KEYS to a file name), ``cifar10`` (``files["archive"]``: the official
    binary tarball), or ``npz`` / ``image_folder`` (no files: ``data.path``).
    ``md5`` maps file names to the MD5 of the file as served (the .gz, the
    tarball), or of a member of it (an extracted CIFAR batch); ``raw_md5``
    optionally maps them to the MD5 of the decompressed bytes, so a recompressed
    or gunzipped copy of the same data still verifies. ``alternatives`` maps a
    key to other names that count as that file (the extracted folder of an
    archive). ``mean``/``std`` are of pixels scaled to [0, 1]: one number, or
    one per channel. ``shape`` is one example's ``(h, w, c)`` when the format
    fixes it.
    """

    name: str
    files: dict
    md5: dict = field(default_factory=dict)
    mirrors: tuple = ()
    mean: float | tuple = 0.0
    std: float | tuple = 1.0
    num_classes: int = 10
    raw_md5: dict = field(default_factory=dict)
    format: str = "idx"
    class_names: tuple = ()
    alternatives: dict = field(default_factory=dict)
    shape: tuple | None = None


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
    """Look for the spec's files: ``(found {key: path}, missing [key, ...])``.

    In each search folder a file also counts under its name without ".gz"
    (read_idx does not care), and under ``spec.alternatives``. Anything at that
    path counts as found, even a directory, so that the reader reports it
    instead of a download clobbering it.
    """
    dirs = search_dirs(spec, root)
    found, missing = {}, []
    for key, fname in spec.files.items():
        names = list(dict.fromkeys([fname, fname.removesuffix(".gz"), *spec.alternatives.get(key, ())]))
        hit = next((d / n for d in dirs for n in names if (d / n).exists()), None)
        if hit is None:
            missing.append(key)
        else:
            found[key] = hit
    return found, missing


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decompressed_md5(path: Path) -> str:
    """The MD5 of a file's bytes after gunzip (of the bytes themselves if it is not gzip, or is corrupt)."""
    blob = path.read_bytes()
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
            pass  # corrupt: its raw bytes match nothing known either
    return hashlib.md5(blob).hexdigest()


def verify_file(spec: DatasetSpec, key: str, path: Path) -> None:
    """Check ``path`` against the spec's MD5 of the served file, or of its decompressed bytes."""
    fname = spec.files[key]
    want, want_raw = spec.md5.get(fname), spec.raw_md5.get(fname)
    if want is None and want_raw is None:
        return  # a config-defined dataset without checksums: nothing to check against
    if not path.is_file():
        read_idx(path)  # raises its one-line error (a directory, say)
    actual = file_md5(path)
    if actual == want:
        return
    expected, got = f"md5 {want}" if want else "", f"got {actual}"
    if want_raw is not None:
        actual_raw = decompressed_md5(path)
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
    """Return ``{key: path}`` of the spec's files, downloading the missing ones.

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
