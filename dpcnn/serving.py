"""The trained network as an MLflow pyfunc model, with nothing pickled.

``load_checkpoint`` turns a training checkpoint into (model, spec, config,
history): what ``dpcnn.predict`` and ``dpcnn.viz`` load a ``.npz`` with.

A logged model is three plain files plus MLflow's own:

* ``weights.npz``  the flat parameter buffer (read with ``allow_pickle=False``);
* ``spec.json``    what rebuilds the network and its input pipeline: the layer
                   specs, input shape, number of classes, the training
                   normalisation (mean, std) and the class names;
* ``python_model.py`` (MLflow "models from code") three lines that hand MLflow a
                   fresh `DpcnnPyfunc`; its ``load_context`` calls
                   `dpcnn.model.Model.from_config` and copies the weights in.

The dpcnn package itself is logged as the model's ``code/`` (``code_paths``),
so a served model runs the layer code it was trained with, anywhere numpy and
mlflow are installed.

Inputs: raw pixels, never normalised ones, in the shape the model was trained
on (the data's: ``(h, w, c)`` = (28, 28, 1) for MNIST, (32, 32, 3) for
CIFAR-10). For MNIST: ``(n, 28, 28, 1)``, ``(n, 28, 28)``, ``(n, 784)`` or one
``(28, 28)`` image; uint8 0-255, or float in [0, 1]. An
image of floats with any value above 1 is taken as 0-255 (that is what JSON
integers become under the float32 signature), so ``{"inputs": <uint8 pixels>}``
over REST works too. The normalisation the network was trained with is applied
here. Output: a DataFrame with ``label`` (the predicted class) and
``prob_0 .. prob_<k-1>`` (the softmax probabilities).

The logged signature is float32 ``(-1, h, w, c)`` of the data: MLflow's schema check runs
before `DpcnnPyfunc.predict`, so through ``mlflow.pyfunc.load_model(...).predict``
and ``/invocations`` send that layout (float32 for Python callers; any JSON
numbers over REST). `python -m dpcnn.predict` converts anything else.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from . import __version__, checkpoint
from .data import DATASETS, get_spec
from .errors import DpcnnError
from .model import Model

SPEC_FILE, WEIGHTS_FILE = "spec.json", "weights.npz"
SPEC_FORMAT = 1

#: Class names of the registered datasets (others get "0", "1", ...; a run's own come from its config).
CLASS_NAMES = {name: list(spec.class_names) for name, spec in DATASETS.items() if spec.class_names}

#: The file MLflow executes to get the model object ("models from code": no pickle).
_MODEL_CODE = '''"""dpcnn pyfunc entry point (MLflow models-from-code); the weights and spec are artifacts."""
from mlflow.models import set_model

from dpcnn.serving import DpcnnPyfunc

set_model(DpcnnPyfunc())
'''


# ----------------------------------------------------------------- the spec

def model_spec(layers: Sequence[Mapping], input_shape, num_classes: int, *, mean: float = 0.0, std: float = 1.0,
               dataset: str | None = None, dtype: str = "float32", num_params: int | None = None,
               class_names: Sequence[str] | None = None) -> dict:
    """Everything needed to rebuild a model and prepare its inputs, as plain JSON-able data.

    ``mean``/``std`` are the normalisation applied to [0, 1] pixels during
    training (0 and 1 when training ran with ``data.normalize=false``).
    """
    names = list(class_names) if class_names else CLASS_NAMES.get(dataset or "", None)
    if names is None or len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]

    def number(v):  # one value, or one per channel
        return float(v) if np.ndim(v) == 0 else [float(u) for u in v]

    return {"format": SPEC_FORMAT, "dpcnn_version": __version__, "dataset": dataset,
            "layers": [dict(layer) for layer in layers], "input_shape": [int(s) for s in input_shape],
            "num_classes": int(num_classes), "mean": number(mean), "std": number(std), "dtype": str(dtype),
            "num_params": num_params, "class_names": names}


def spec_from_config(cfg: Mapping, num_params: int | None = None) -> dict:
    """The spec of a training run from its composed config (as in a checkpoint's ``meta["config"]``).

    Training writes what the data decided into the config (`dpcnn.data.fit_config`:
    input shape, classes and their names, per-channel mean/std), so the spec, and
    the served model's signature, follow the data. Configs of older runs fall
    back on the registry (and on MNIST's 28x28x1).
    """
    data = get_spec(cfg["data"])
    normalize = bool(cfg["data"].get("normalize", True))
    mean, std = (data.mean, data.std) if normalize else (0.0, 1.0)
    shape = cfg["model"].get("input_shape") or data.shape or (28, 28, 1)
    return model_spec(cfg["model"]["layers"], shape, data.num_classes, mean=mean, std=std, dataset=data.name,
                      dtype=str(cfg.get("trainer", {}).get("dtype", "float32")), num_params=num_params,
                      class_names=cfg["data"].get("class_names") or data.class_names or None)


def build_model(spec: Mapping, params: np.ndarray | None = None):
    """A `dpcnn.model.Model` from a spec, with ``params`` copied into it when given."""
    model = Model.from_config(spec["layers"], input_shape=tuple(spec["input_shape"]),
                              num_classes=int(spec["num_classes"]), dtype=np.dtype(spec.get("dtype", "float32")))
    if params is not None:
        params = np.asarray(params)
        if params.shape != model.params.shape:
            raise DpcnnError(f"weights hold {params.size:,} parameters but the spec's model has "
                             f"{model.num_params:,}; the weights belong to another model")
        model.params[:] = params
    return model


def save_model_files(directory: str | Path, params: np.ndarray, spec: Mapping) -> dict[str, str]:
    """Write ``weights.npz`` and ``spec.json`` into ``directory``; returns MLflow's ``artifacts`` mapping."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / WEIGHTS_FILE, params=np.asarray(params))
    (directory / SPEC_FILE).write_text(json.dumps(dict(spec), indent=1))
    return {"weights": str(directory / WEIGHTS_FILE), "spec": str(directory / SPEC_FILE)}


def load_model_files(weights: str | Path, spec: str | Path):
    """(model, spec) from the two files written by `save_model_files`."""
    spec_d = json.loads(Path(spec).read_text())
    if spec_d.get("format", 0) > SPEC_FORMAT:
        raise DpcnnError(f"{spec}: model spec format {spec_d['format']} is newer than this dpcnn reads "
                         f"({SPEC_FORMAT}); upgrade dpcnn")
    with np.load(weights, allow_pickle=False) as z:
        params = z["params"]
    return build_model(spec_d, params), spec_d


def load_checkpoint(path: str | Path):
    """(model, spec, config dict, history) from a training checkpoint."""
    path = Path(path)
    if not (path.is_file() or (path / checkpoint.LAST).is_file()):
        raise DpcnnError(f"{path}: no such checkpoint; give a checkpoints/last.npz or step-*.npz of a dpcnn run")
    ckpt = checkpoint.load(path)
    cfg = yaml.safe_load(ckpt.meta.get("config") or "{}")
    if not cfg.get("model") or not cfg.get("data"):
        raise DpcnnError(f"{path} holds no training config; was it written by dpcnn.train?")
    spec = spec_from_config(cfg, num_params=int(ckpt.params.size))
    return build_model(spec, ckpt.params), spec, cfg, ckpt.meta.get("history") or []


# ------------------------------------------------------------------ inputs

def to_unit_images(x, input_shape: Sequence[int]) -> np.ndarray:
    """Raw pixels in any accepted layout -> float32 ``(n, *input_shape)`` in [0, 1].

    uint8 (and other integer) arrays are divided by 255. Float images are kept
    as they are if every value is within [0, 1], else divided by 255 (per
    image), so JSON integers 0-255 work under a float signature.
    """
    h, w, c = (int(s) for s in input_shape)
    if hasattr(x, "to_numpy"):  # a pandas DataFrame: one row per image
        x = x.to_numpy()
    x = np.asarray(x)
    if x.dtype == object:
        x = np.asarray(x.tolist())
    if x.dtype.kind not in "uif":
        raise ValueError(f"images must be numbers, got dtype {x.dtype}")
    if x.shape == (h, w) and c == 1 or x.shape == (h, w, c):
        x = x[None]  # one image
    n = x.shape[0] if x.ndim else 0
    if x.ndim == 2 and x.shape[1] == h * w * c:
        x = x.reshape(n, h, w, c)
    elif x.ndim == 3 and x.shape[1:] == (h, w) and c == 1:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise ValueError(f"expected images of shape (n, {h}, {w}, {c}), (n, {h}, {w}) or (n, {h * w * c}), "
                         f"got {x.shape}")
    if x.dtype.kind in "ui":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError("integer pixels must be within 0..255")
        return (x.astype(np.float32) / np.float32(255.0))
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("pixels must be finite numbers")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"pixels must be within [0, 1] (or 0..255), got values in [{x.min():g}, {x.max():g}]")
    over = x.reshape(n, -1).max(axis=1) > 1 if n else np.zeros(0, bool)
    if over.any():
        x = x.copy()
        x[over] /= np.float32(255.0)
    return x


def normalise(x01: np.ndarray, spec: Mapping) -> np.ndarray:
    """[0, 1] pixels -> what the network saw in training: ``(x - mean) / std``, float32."""
    mean, std = np.float32(spec.get("mean", 0.0)), np.float32(spec.get("std", 1.0))
    return ((x01 - mean) / std).astype(np.float32)


def predict_proba(model, spec: Mapping, images, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities ``(n, k)`` for raw images in any accepted layout."""
    x = normalise(to_unit_images(images, spec["input_shape"]), spec)
    return model.predict_proba(x.astype(model.dtype, copy=False), batch_size=batch_size)


def output_frame(probs: np.ndarray):
    """The pyfunc output: ``label`` and ``prob_<i>`` columns."""
    import pandas as pd

    probs = np.asarray(probs, np.float32)
    cols = {"label": probs.argmax(axis=1).astype(np.int64) if len(probs) else np.zeros(0, np.int64)}
    cols.update({f"prob_{i}": probs[:, i] for i in range(probs.shape[1])})
    return pd.DataFrame(cols)


# ------------------------------------------------------------------ MLflow

try:
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the helpers importable without it
    _PythonModel = object


class DpcnnPyfunc(_PythonModel):
    """MLflow pyfunc wrapper: rebuilds the network from ``spec.json`` and ``weights.npz``."""

    def load_context(self, context):
        self.model, self.spec = load_model_files(context.artifacts["weights"], context.artifacts["spec"])

    # The hint (np.ndarray: MLflow infers no schema from it) only quiets MLflow's "add type
    # hints" warning; DataFrames and lists are accepted as well.
    def predict(self, context, model_input: np.ndarray, params=None):  # noqa: ARG002 - MLflow's interface
        return output_frame(predict_proba(self.model, self.spec, model_input))


def signature(spec: Mapping):
    """float32 ``(-1, *input_shape)`` in; ``label`` and one probability column per class out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["input_shape"]))])
    outputs = Schema([ColSpec("long", "label")] + [ColSpec("float", f"prob_{i}") for i in range(spec["num_classes"])])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """What the model needs besides its logged code (dpcnn itself travels in ``code/``)."""
    import mlflow
    import pandas

    return [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", f"pandas=={pandas.__version__}"]


def log_pyfunc(run_id: str, experiment_id: str, params: np.ndarray, spec: Mapping, input_example: np.ndarray,
               *, name: str = "model", registered_model_name: str | None = None, step: int = 0,
               tracking_uri: str | None = None, workdir: str | Path | None = None, model_id: str | None = None):
    """Log the model to run ``run_id`` as MLflow pyfunc model ``name``; returns MLflow's ModelInfo.

    ``input_example`` is raw float32 pixels in [0, 1], shaped like the
    signature. ``step`` links the run's metrics at that step to the logged
    model (the Models tab then shows its test accuracy). ``model_id``: finish that (PENDING)
    logged model instead of creating a new one, so a retry after an outage never leaves two
    (`dpcnn.replay.log_model_once` decides).
    """
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        artifacts = save_model_files(Path(tmp) / "files", params, spec)
        code = Path(tmp) / "python_model.py"
        code.write_text(_MODEL_CODE)
        # Created here, not by Model.log: left to itself MLflow files the model under
        # the default experiment unless a fluent run is active.
        if model_id is None:
            model_id = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id,
                                                  tags={"dpcnn.version": __version__}).model_id
        # On failure the model stays PENDING: the retry finishes this one rather than logging a second.
        return Model.log(None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model_id,
                         step=step, python_model=str(code), artifacts=artifacts,
                         code_paths=[str(Path(__file__).resolve().parent)],
                         signature=signature(spec), input_example=np.asarray(input_example, np.float32),
                         pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
                         await_registration_for=0)
