"""Classify images with a trained dpcnn model and print the predictions.

    python -m dpcnn.predict model=runs:/<run id>/model images=t10k-images-idx3-ubyte.gz limit=10
    python -m dpcnn.predict model=models:/dpcnn-mnist/1 images=digit.png,other.png
    python -m dpcnn.predict model=outputs/<date>/<time>/checkpoints/last.npz images='digits/*.png'

``model`` is any MLflow model URI (``runs:/``, ``models:/``, a local model
folder) of a model logged by ``dpcnn.train``, or a training checkpoint
(``.npz``; no MLflow needed). ``images`` is an IDX image file (gzip or raw,
as MNIST ships) or PNG/JPEG files: comma-separated, globs allowed. Images of
the model's shape (the data it was trained on: 28x28 grey for MNIST, 32x32
RGB for CIFAR-10) are taken as they are; others are converted to its channels
and resized (bilinear), with one warning. For a grey model, a light
background is inverted to MNIST's white-on-black (``invert=auto``, or
``true``/``false``).

Other keys: ``labels=<IDX label file>`` (prints the accuracy), ``limit=N``
(first N images), ``tracking_uri=...`` (default: $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db here, as training uses), ``top=3`` (how many classes to
show per image).

Output: one line per image, ``<source>  <predicted class>  <probability>``
(plus the runners-up and, with labels, the true class), then a summary line.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cli import parse_kv
from .errors import DpcnnError
from .idx import read_idx
from .store import default_uri, existing_store, fail_fast, why

KEYS = ("model", "images", "labels", "limit", "tracking_uri", "invert", "top")


# ------------------------------------------------------------------ images

def expand(spec: str) -> list[Path]:
    """``a.png,b*.png`` -> the files, in order; a pattern that matches nothing is an error."""
    paths: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        hits = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not hits:
            raise DpcnnError(f"no file matches {part!r}")
        paths += [Path(h) for h in hits]
    if not paths:
        raise DpcnnError("images= is empty; give an IDX file or PNG files")
    return paths


def fit_shape(images: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """IDX images ``(n, h, w, c)`` in the model's ``(h, w, c)``, channels converted and resized: (images, changed?)."""
    h, w, c = shape
    if images.shape[1:] == (h, w, c):
        return images, False
    x = images.astype(np.float32)
    if x.shape[-1] != c:  # grey -> RGB: repeat; RGB -> grey: the mean
        x = np.repeat(x, c, axis=-1) if x.shape[-1] == 1 else x.mean(axis=-1, keepdims=True)
    if x.shape[1:3] != (h, w):
        from .images import resize_bilinear

        x = resize_bilinear(x, (h, w))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8) if images.dtype == np.uint8 else x, True


def load_images(paths: Sequence[Path], shape: tuple[int, int, int], invert: str = "auto"):
    """(images, sources, inverted count): uint8 images in the model's ``(h, w, c)`` layout.

    One IDX file, or any number of PNG/JPEG files (each one image). Images of
    another size or number of channels are converted and resized, with a warning.
    """
    from .images import IMAGE_SUFFIXES, decode

    h, w, c = shape
    first = paths[0]
    if len(paths) == 1 and first.suffix.lower() not in IMAGE_SUFFIXES:
        images = read_idx(first)  # a DataError (one line) if it is not an IDX file
        images, changed = fit_shape(images[..., None] if images.ndim == 3 else images, shape)
        if changed:
            _warn(f"{first}: images converted to the model's {w}x{h}x{c}")
        return images, [f"{first.name}[{i}]" for i in range(len(images))], 0
    imgs, inverted, resized = [], 0, 0
    for p in paths:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DpcnnError(f"{p}: give either one IDX file or image files (.png, .jpg)")
        try:
            img, was_resized = decode(p, (h, w), c)
        except (OSError, ValueError, SyntaxError) as e:
            raise DpcnnError(f"{p}: not a readable image ({' '.join(str(e).split())})") from None
        resized += was_resized
        if c == 1:  # digits: white on black, as MNIST
            border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
            if invert == "true" or (invert == "auto" and border.mean() > 127.5):
                img, inverted = 255 - img, inverted + 1
        imgs.append(img)
    if resized:
        _warn(f"{resized} of {len(paths)} image(s) resized to the model's {w}x{h} pixels")
    return np.stack(imgs), [str(p) for p in paths], inverted


def _warn(message: str) -> None:
    print(f"dpcnn: warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ models

class Predictor:
    """A model from an MLflow URI or a checkpoint: ``proba(raw images) -> (n, k)``."""

    def __init__(self, uri: str, tracking_uri: str | None = None):
        path = Path(uri)
        if path.suffix == ".npz" or (path.is_dir() and (path / "last.npz").is_file()):
            from .serving import load_checkpoint  # as mlflow: serving imports mlflow.pyfunc (seconds)

            self.model, self.spec, _, _ = load_checkpoint(path)
            self._pyfunc = None
            self.input_shape = tuple(self.spec["input_shape"])
            self.class_names = self.spec["class_names"]
            return
        # A local model folder needs no store; runs:/ and models:/ need an existing one (checked before the
        # seconds of importing MLflow).
        store = (tracking_uri or default_uri()) if path.exists() else existing_store(tracking_uri)
        import mlflow.pyfunc

        mlflow.set_tracking_uri(store)
        try:
            self._pyfunc = mlflow.pyfunc.load_model(uri)
        except Exception as e:  # noqa: BLE001 - bad URI, no such run, server down: one line
            raise DpcnnError(f"cannot load model {uri!r}: {why(e)}") from None
        schema = self._pyfunc.metadata.get_input_schema()
        self.input_shape = (28, 28, 1)
        if schema is not None and schema.is_tensor_spec():
            self.input_shape = tuple(int(s) for s in schema.inputs[0].shape[1:])
        inner = self._pyfunc.unwrap_python_model() if hasattr(self._pyfunc, "unwrap_python_model") else None
        spec = getattr(inner, "spec", None) or {}
        self.class_names = spec.get("class_names")

    def proba(self, images) -> np.ndarray:
        from .serving import predict_proba, to_unit_images

        if self._pyfunc is None:
            return predict_proba(self.model, self.spec, images)
        x = to_unit_images(images, self.input_shape)  # the signature's float32 [0, 1] layout
        out = self._pyfunc.predict(x)
        cols = sorted((c for c in out.columns if str(c).startswith("prob_")), key=lambda c: int(c[5:]))
        return out[cols].to_numpy(np.float32)


# ------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> int:
    fail_fast()  # the same HTTP limits as training: one line within seconds when the server is away
    args = parse_kv(sys.argv[1:] if argv is None else argv, KEYS, __doc__)
    missing = [k for k in ("model", "images") if not args.get(k)]
    if missing:
        raise SystemExit(f"error: missing {' and '.join(k + '=' for k in missing)} (see --help)")
    invert = args.get("invert", "auto").lower()
    if invert not in ("auto", "true", "false"):
        raise SystemExit("error: invert= must be auto, true or false")
    try:
        limit = int(args["limit"]) if args.get("limit") else None
        top = max(1, int(args.get("top", 3)))
    except ValueError:
        raise SystemExit("error: limit= and top= take integers") from None
    try:
        paths = expand(args["images"])
        predictor = Predictor(args["model"], args.get("tracking_uri"))
        images, sources, inverted = load_images(paths, predictor.input_shape, invert)
        labels = None
        if args.get("labels"):
            labels = np.asarray(read_idx(args["labels"]), np.int64)
            if len(labels) != len(images):
                raise DpcnnError(f"{args['labels']}: {len(labels)} labels for {len(images)} images")
        if limit is not None:
            images, sources = images[:limit], sources[:limit]
            labels = labels[:limit] if labels is not None else None
        probs = predictor.proba(images)
    except (DpcnnError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    names = predictor.class_names or [str(i) for i in range(probs.shape[1])]
    pred = probs.argmax(axis=1)
    width = max(len(s) for s in sources) if sources else 6
    print(f"{'image':<{width}}  predicted  probability  {'next best':<24}" + ("  true" if labels is not None else ""))
    for i, src in enumerate(sources):
        order = np.argsort(-probs[i], kind="stable")[:top]
        others = ", ".join(f"{names[j]} {probs[i, j]:.1%}" for j in order[1:])
        line = f"{src:<{width}}  {names[pred[i]]:<9}  {probs[i, pred[i]]:>11.2%}  {others:<24}"
        if labels is not None:
            ok = "" if labels[i] == pred[i] else "  <- wrong"
            line += f"  {names[labels[i]]}{ok}"
        print(line)
    summary = f"{len(sources)} image(s)"
    if inverted:
        summary += f", {inverted} inverted to white-on-black (invert=false to keep them)"
    if labels is not None and len(labels):
        summary += f"; accuracy {np.mean(pred == labels):.2%}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
