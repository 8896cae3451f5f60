"""Image files: decoding PNG/JPEG (Pillow), resizing, and image folders decoded once into an ``.npz`` cache.

An image folder has one sub-folder per class, either directly::

    flowers/daisy/*.jpg  flowers/rose/*.png ...            (data.test_fraction splits it)

or under ``train/`` and ``test/``::

    flowers/train/daisy/*.jpg ...  flowers/test/daisy/*.jpg ...

Classes are the sub-folder names, sorted (label i = the i-th name). Every
image is decoded once, converted to grey (``channels=1``) or RGB (3),
transparency composited over white, resized to ``image_size`` (bilinear, with
Pillow's antialiasing) and kept as uint8. The result is cached beside the data
as ``.dpcnn-cache-<h>x<w>x<c>.npz`` (in the user's cache folder if the data's
folder is read-only), keyed by every file's path, size and modification time:
a second run reads the cache (one file) and any added, removed or changed image
rebuilds it. Files that cannot be decoded are listed in one error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .idx import _one_line, resolve_root

log = logging.getLogger("dpcnn")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_FORMAT = 1
_MODES = {1: "L", 3: "RGB"}


def decode(path: str | Path, size: tuple[int, int] | None, channels: int) -> tuple[np.ndarray, bool]:
    """One PNG/JPEG as uint8 ``(h, w, channels)``, resized to ``size`` (h, w) if given; (image, resized?).

    Raises OSError/ValueError (Pillow's) for a file that is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not later
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        img = img.convert(_MODES[channels])
        resized = size is not None and img.size != (size[1], size[0])
        if resized:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        x = np.asarray(img, np.uint8)
    return (x[..., None] if x.ndim == 2 else x), resized


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Images ``(n, h, w, c)`` -> float32 ``(n, H, W, c)``, bilinear (half-pixel centres), all at once."""
    def taps(src: int, dst: int):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, src - 1), (pos - lo).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = taps(x.shape[1], size[0]), taps(x.shape[2], size[1])
    x = np.asarray(x, np.float32)
    rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


# ------------------------------------------------------------------ image folders

def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def listing(root: str | Path) -> tuple[list[str], list[tuple[Path, int, int]]]:
    """(class names, [(file, label, split)]): split 0 train, 1 test, 2 not split (data.test_fraction decides)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; data.path must be a folder with one sub-folder of PNG/JPEG "
                        "images per class (or train/ and test/ folders of those)")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    parts = [(root / "train", 0), (root / "test", 1)] if split else [(root, 2)]
    classes = [p.name for p in _class_dirs(parts[0][0])]
    if not classes:
        raise DataError(f"{parts[0][0]}: no class folders in it; put each class's images in a sub-folder "
                        "named after the class")
    files: list[tuple[Path, int, int]] = []
    for folder, s in parts:
        for d in _class_dirs(folder):
            if d.name not in classes:
                raise DataError(f"{d}: class {d.name!r} is not among the training classes ({', '.join(classes)})")
            found = _images_in(d)
            if not found and s != 1:
                raise DataError(f"{d}: no PNG/JPEG images in class folder {d.name!r}; add some or remove it")
            files += [(f, classes.index(d.name), s) for f in found]
    return classes, files


def _key(root: Path, files, size, channels) -> str:
    """Hash of every file's path, size and modification time, and of the decoding settings."""
    h = hashlib.blake2b(f"{CACHE_FORMAT} {tuple(size)} {channels}".encode(), digest_size=16)
    for f, label, split in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\0{split}\n".encode())
    return h.hexdigest()


def cache_path(root: str | Path, size, channels: int) -> Path:
    """Beside the data if that folder is writable, else in the user's cache folder (one per data folder)."""
    root = Path(root).resolve()
    name = f".dpcnn-cache-{size[0]}x{size[1]}x{channels}.npz"
    if os.access(root, os.W_OK):
        return root / name
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return resolve_root(None) / "image-cache" / f"{root.name}-{tag}{name}"


def _decode_all(root: Path, files, size, channels) -> tuple[np.ndarray, list[str], int]:
    """Decode every file (once): (uint8 images, md5 of each file, how many were resized)."""
    x = np.empty((len(files), size[0], size[1], channels), np.uint8)
    md5s, bad, resized = [], [], 0
    for i, (f, _, _) in enumerate(files):
        try:
            x[i], r = decode(f, size, channels)
            resized += r
        except (OSError, ValueError, SyntaxError) as e:  # Pillow: UnidentifiedImageError is an OSError
            bad.append(f"{f.relative_to(root)} ({_one_line(e)[:80]})")
        md5s.append(hashlib.md5(f.read_bytes()).hexdigest())
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} of the {len(files)} images in {root} cannot be read: {'; '.join(bad[:10])}"
                        f"{more}; fix or remove them")
    return x, md5s, resized


def _write_cache(cache: Path, **arrays) -> None:
    """Atomically (a temporary file renamed into place): a job reading it never sees half a cache."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=".tmp-", suffix=".npz", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        raise DataError(f"{cache}: cannot write the image cache ({_one_line(e.strerror or e)}); free disk space "
                        "or make the folder writable") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def load_image_folder(root: str | Path, size, channels: int, build: bool = True):
    """``(x uint8 (n, h, w, c), y, split, class names, {file: md5})`` of an image folder, through its cache.

    ``split`` is 0 (train/), 1 (test/) or 2 (no train/test folders) per image.
    With ``build=False`` a missing or stale cache is an error (the ranks that
    wait while rank 0 builds it never build one of their own).
    """
    root = Path(root)
    if channels not in _MODES:
        raise DataError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes, files = listing(root)
    key, cache = _key(root, files, size, channels), cache_path(root, size, channels)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    names = [str(f.relative_to(root)) for f, _, _ in files]
                    return z["x"], z["y"], z["split"], [str(c) for c in z["classes"]], dict(zip(names, z["md5"]))
        except (OSError, ValueError, KeyError) as e:
            log.warning("image cache %s is unreadable (%s); decoding the images again", cache, _one_line(e))
    if not build:
        raise DataError(f"{cache}: the image cache is missing or stale (did {root} change while the job started?)")
    x, md5s, resized = _decode_all(root, files, size, channels)
    y = np.array([label for _, label, _ in files], np.int64)
    split = np.array([s for _, _, s in files], np.int8)
    _write_cache(cache, x=x, y=y, split=split, classes=np.array(classes), md5=np.array(md5s), key=np.array(key))
    log.info("decoded %d images of %d classes from %s (%d resized to %dx%d), cached in %s", len(files),
             len(classes), root, resized, size[1], size[0], cache)
    return x, y, split, classes, dict(zip((str(f.relative_to(root)) for f, _, _ in files), md5s))
