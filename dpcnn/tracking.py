"""MLflow on rank 0, a no-op everywhere else.

The tracker talks to MLflow through ``MlflowClient`` with an explicit run id
(no global "active run"), so sweeps and nested runs cannot get crossed. A
tracker that stops answering mid-run must not cost any training: failed
calls are queued, a warning is printed once, and the queue is replayed when
the server answers again (at the latest when the run ends; what still cannot
be sent is written to ``<run_dir>/mlflow_pending.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import DpcnnError

log = logging.getLogger(__name__)

TERMINAL = ("FINISHED", "FAILED", "KILLED")


class TrackingError(DpcnnError):
    """The tracking server cannot be reached or refuses the run."""


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


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else SQLite ``mlflow.db`` in the directory the user ran from."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


class NullTracker:
    """What non-root ranks (and ``tracking=none``) get: every call does nothing."""

    run_id = None
    enabled = False

    def start(self, *args, **kwargs):
        return None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, name):
        pass

    def set_tags(self, tags):
        pass

    def end(self, status="FINISHED"):
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through a queue that survives server outages."""

    enabled = True

    def __init__(self, uri: str | None, experiment: str, run_dir: str | Path):
        # Fail fast instead of MLflow's default minutes of retries: a tracker
        # outage must not stall training (the queue catches up later).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_uri()
        self.run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            raise TrackingError(f"cannot reach the MLflow tracking store at {self.uri} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); start the server, fix tracking.uri, "
                                "or run with tracking=none") from None
        self.run_id: str | None = None
        self._pending: list[tuple[str, tuple, dict]] = []
        self._warned = False

    # --- the queue -----------------------------------------------------------
    def _call(self, method: str, *args, **kwargs) -> None:
        self._pending.append((method, args, kwargs))
        self.flush()

    def flush(self) -> bool:
        """Send queued calls in order; stop at the first failure. True if the queue is empty."""
        while self._pending:
            method, args, kwargs = self._pending[0]
            try:
                getattr(self.client, method)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if not self._warned:
                    log.warning("MLflow call %s failed (%s: %s); training continues, %d call(s) queued and "
                                "retried later", method, type(e).__name__, str(e).splitlines()[0][:160],
                                len(self._pending))
                    self._warned = True
                return False
            self._pending.pop(0)
            if self._warned and not self._pending:
                log.warning("MLflow is reachable again; queued calls sent")
                self._warned = False
        return True

    # --- the run -------------------------------------------------------------
    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow at {self.uri} refused to create a run ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); fix tracking.uri or run with tracking=none") from None
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self._call("log_batch", self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._call("log_batch", self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call("log_text", self.run_id, text, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self._call("set_terminated", self.run_id, status)
        if not self.flush():
            self._save_pending()

    def _save_pending(self) -> None:
        """Keep what could not be sent, so no record of the run is lost."""
        out = self.run_dir / "mlflow_pending.json"
        records = [{"method": m, "args": [repr(a) for a in args]} for m, args, _ in self._pending]
        try:
            out.write_text(json.dumps({"run_id": self.run_id, "uri": self.uri, "calls": records}, indent=1))
            log.warning("MLflow unreachable at the end of the run: %d call(s) written to %s", len(records), out)
        except OSError as e:
            log.warning("MLflow unreachable and %s not writable (%s): %d call(s) lost", out, e, len(records))


def make_tracker(cfg: Mapping, run_dir: str | Path, is_root: bool) -> NullTracker:
    """The tracker this rank should use: MLflow on rank 0 when tracking.backend is mlflow."""
    if not is_root or cfg.get("backend", "mlflow") in (None, "none"):
        return NullTracker()
    return MlflowTracker(cfg.get("uri"), cfg.get("experiment", "dpcnn"), run_dir)


def mark_run(uri: str | None, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> bool:
    """End another run (e.g. one left RUNNING by a killed job) if it is still running."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri or default_uri())
        run = client.get_run(run_id)
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        if run.info.status not in TERMINAL:
            client.set_terminated(run_id, status)
            return True
    except Exception as e:  # noqa: BLE001
        log.warning("could not update MLflow run %s: %s", run_id, e)
    return False
