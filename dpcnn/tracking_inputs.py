"""What a run records as its inputs: the config as flat MLflow params, the datasets as MLflow dataset inputs.

Used by `dpcnn.train` (through `dpcnn.tracking`, which re-exports these names)
and by the sweep's FAILED records (`dpcnn.sweep.record`).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping

import numpy as np


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists are kept as their string form."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def array_digest(*arrays) -> str:
    """A short content hash of arrays (shape, dtype and every byte): the dataset digest MLflow shows.

    CRC-32, not a cryptographic hash: it tells datasets apart, and it reads full
    MNIST's 188 MB of float32 in well under a tenth of a second.
    """
    crc = 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(a).cast("B"), crc)
    return f"{crc:08x}"


def dataset_input(name: str, features, targets, source: str | None, context: str):
    """An MLflow ``DatasetInput`` for a NumPy split: name, digest, source (where the files are), context tag.

    ``context`` is ``training``, ``validation`` or ``testing``; the UI shows it
    next to the dataset.
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local folder
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_numpy(features, targets=targets, source=source, name=name,
                                    digest=array_digest(features, targets))
    return DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context)])
