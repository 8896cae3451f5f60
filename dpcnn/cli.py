"""What the ``python -m dpcnn.predict`` and ``python -m dpcnn.viz`` commands share.

* ``parse_kv``                 ``key=value`` arguments (Hydra style) -> dict, ``--help``
* ``download_run_checkpoint``  an MLflow run's logged ``checkpoints/last.npz``, fetched to a folder
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import DpcnnError
from .store import existing_store, fail_fast, why


def parse_kv(argv: Sequence[str], allowed: Sequence[str], usage: str) -> dict[str, str]:
    """``key=value`` arguments (Hydra style) -> dict; ``-h``/``--help`` prints ``usage``."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    out: dict[str, str] = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(f"error: unexpected argument {a!r}; use key=value with key one of "
                             f"{', '.join(allowed)} (see --help)")
        out[key] = value
    return out


def download_run_checkpoint(run_id: str, tracking_uri: str | None, dst: str | Path) -> Path:
    """The run's logged ``checkpoints/last.npz``."""
    fail_fast()  # the same HTTP limits as training: a server that is away is one line within seconds
    uri = existing_store(tracking_uri)
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.npz",
                                                        dst_path=str(dst), tracking_uri=uri))
    except Exception as e:  # noqa: BLE001 - no such run, no checkpoint logged, server down: one line
        raise DpcnnError(f"cannot get checkpoints/last.npz of run {run_id} from {uri}: {why(e)}") from None
