"""MLflow on rank 0, a no-op everywhere else.

The tracker talks to MLflow through ``MlflowClient`` with an explicit run id
(no global "active run"), so sweeps and nested runs cannot get crossed. A
tracker that stops answering mid-run must not cost any training: failed
calls are queued, a warning is printed once, and the queue is replayed when
the server answers again (at the latest when the run ends, which waits up to
``flush_timeout`` seconds for it; what still cannot be sent is written to
``<run_dir>/mlflow_pending.json``). While the server is away, a new attempt is
made at most every ``retry_interval`` seconds, so a hung server costs training
at most one HTTP timeout per interval. A call the server *refuses* (a bad
parameter, say) is dropped with a warning instead of blocking the queue.

Besides params, metrics, tags and files, the tracker logs datasets as run
inputs (`dataset_input`, built in ``tracking_inputs.py``), tables, arbitrary
MLflow calls such as logging the pyfunc model (`call`), and system metrics
(CPU, memory, disk, network) from MLflow's own sampler.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

try:
    from requests import RequestException
except ImportError:  # pragma: no cover - requests comes with mlflow
    RequestException = OSError

from .errors import DpcnnError
from .tracking_inputs import array_digest, dataset_input, flatten  # noqa: F401 - dpcnn.tracking's names too

log = logging.getLogger(__name__)

TERMINAL = ("FINISHED", "FAILED", "KILLED")
#: Set by the sweep's callback (dpcnn.sweep.record), read by `MlflowTracker.start`: parent run id, tags (JSON).
ENV_PARENT = "DPCNN_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "DPCNN_MLFLOW_TAGS"
#: MLflow error codes that mean "the server answered and will never accept this call".
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                              "MALFORMED_REQUEST", "NOT_IMPLEMENTED"})


class TrackingError(DpcnnError):
    """The tracking server cannot be reached or refuses the run."""


def existing_store(uri: str | None = None) -> str:
    """``uri`` (default: `default_uri`), refusing a SQLite file that does not exist.

    For commands that read runs (``dpcnn.predict``, ``dpcnn.viz``): MLflow would
    otherwise create an empty ``mlflow.db`` and then report "run not found".
    """
    uri = uri or default_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise TrackingError(f"no MLflow store at {uri}: run this where you trained (where mlflow.db is), or pass "
                            "tracking_uri=... (or set MLFLOW_TRACKING_URI)")
    return uri


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else SQLite ``mlflow.db`` in the directory the user ran from."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _why(e: BaseException) -> str:
    """A few words for why an MLflow call failed, instead of urllib3's paragraph."""
    text = str(e)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host"),
                          ("Connection reset", "connection reset"), ("RemoteDisconnected", "connection closed")):
        if needle in text:
            return short
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _Unreachable:
    """Stands in for a tracker whose store could not be reached: `start` raises the error.

    Only rank 0 builds a real tracker, so raising at construction would stop rank 0
    alone and leave the others waiting; raised from ``start`` (which the trainer runs
    under `agree`), every rank stops with the same one-line error.
    """

    enabled = True
    run_id = None

    def __init__(self, error: Exception):
        self.error = error

    def start(self, *args, **kwargs):
        raise self.error

    def __getattr__(self, name):  # anything else: a no-op (never reached before start)
        return lambda *args, **kwargs: None


class _Named:
    """A queued callable with the name warnings and ``mlflow_pending.json`` use for it."""

    def __init__(self, fn: Callable[[], object], name: str):
        self.fn, self.__name__ = fn, name

    def __call__(self):
        return self.fn()

    def __repr__(self):
        return self.__name__


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

    def log_artifacts(self, local_dir, artifact_path=None):
        pass

    def log_inputs(self, datasets):
        pass

    def log_table(self, data, artifact_file):
        pass

    def call(self, fn, what):
        pass

    def start_system_metrics(self, interval=10.0):
        pass

    def end(self, status="FINISHED", wait=None, interrupted=None):
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through a queue that survives server outages."""

    enabled = True

    def __init__(self, uri: str | None, experiment: str, run_dir: str | Path, *, flush_timeout: float = 60.0,
                 retry_interval: float = 5.0):
        # Fail fast instead of MLflow's default minutes of retries: a tracker
        # outage must not stall training (the queue catches up later).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the training log
        # urllib3 logs every retry as a warning; our queue says it once, in one line.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_uri()
        self.run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            hint = ""
            if self.uri.startswith(("http://", "https://")):
                hint = " (e.g. mlflow server --host 127.0.0.1 --port <port> --backend-store-uri sqlite:///mlflow.db)"
            raise TrackingError(f"cannot reach the MLflow tracking store at {self.uri} ({_why(e)}); start the "
                                f"server{hint}, fix tracking.uri, or run with tracking=none") from None
        self.run_id: str | None = None
        self.flush_timeout, self.retry_interval = float(flush_timeout), float(retry_interval)
        self._pending: list[tuple[str | Callable, tuple, dict]] = []
        self._warned = False
        self._retry_at = 0.0  # monotonic time before which a failed queue is not retried
        self._monitor = None  # MLflow's system-metrics sampler, when enabled

    # --- the queue -----------------------------------------------------------
    def _call(self, method: str | Callable, *args, **kwargs) -> None:
        """Queue ``client.<method>(*args, **kwargs)`` (or ``method(*args, **kwargs)`` for a callable) and flush."""
        self._pending.append((method, args, kwargs))
        self.flush()

    @staticmethod
    def _name(method) -> str:
        return method if isinstance(method, str) else getattr(method, "__name__", repr(method))

    @staticmethod
    def _permanent(e: BaseException) -> bool:
        """True for errors that retrying cannot fix: the server refused the call, or our code raised."""
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):
            return e.error_code in PERMANENT_ERRORS
        return not isinstance(e, (OSError, RequestException, TimeoutError))

    def flush(self, force: bool = False) -> bool:
        """Send queued calls in order; stop at the first failure. True if the queue is empty.

        After a failure, calls are only queued until ``retry_interval`` seconds
        have passed (or ``force``).
        """
        if self._pending and not force and time.monotonic() < self._retry_at:
            return False
        while self._pending:
            method, args, kwargs = self._pending[0]
            try:
                fn = getattr(self.client, method) if isinstance(method, str) else method
                fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if self._permanent(e):
                    log.warning("MLflow call %s failed and is dropped (%s)", self._name(method), _why(e))
                    self._pending.pop(0)
                    continue
                self._retry_at = time.monotonic() + self.retry_interval
                if not self._warned:
                    log.warning("MLflow call %s to %s failed (%s); training continues, %d call(s) queued and "
                                "retried every %g s", self._name(method), self.uri, _why(e), len(self._pending),
                                self.retry_interval)
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
        # A sweep trial (dpcnn.sweep, rank 0) nests its run under the sweep's parent run and tags it.
        parent_run_id = parent_run_id or os.environ.get(ENV_PARENT)
        try:
            tags.update({str(k): str(v) for k, v in json.loads(os.environ.get(ENV_TAGS) or "{}").items()})
        except (ValueError, AttributeError):
            log.warning("%s is not a JSON object; ignored", ENV_TAGS)
        if run_name and "dpcnn.sweep.trial" in tags:
            run_name = f"{run_name}-t{tags['dpcnn.sweep.trial']}"
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

    def log_artifacts(self, local_dir, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", self.run_id, str(local_dir), artifact_path)

    def log_inputs(self, datasets: Sequence) -> None:
        """Datasets as run inputs (see `dataset_input`): the UI lists them with the run."""
        if datasets:
            self._call("log_inputs", self.run_id, datasets=list(datasets))

    def log_table(self, data, artifact_file: str) -> None:
        """A DataFrame (or dict of columns) as a table artifact the UI can display and compare."""
        self._call("log_table", self.run_id, data=data, artifact_file=artifact_file)

    def call(self, fn: Callable[[], object], what: str) -> None:
        """Queue any MLflow work (e.g. logging the model) behind the calls before it; ``what`` names it."""
        self._call(_Named(fn, what))

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """Sample CPU, memory, disk and network every ``interval`` s into ``system/*`` metrics.

        MLflow's own sampler (a daemon thread; needs psutil). It stops for good
        if the server goes away; training is not affected.
        """
        if self.run_id is None or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=float(interval),
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing: training goes on without
            log.warning("system metrics disabled: %s: %s", type(e).__name__, e)
            self._monitor = None

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("stopping the system metrics sampler failed: %s", e)
            self._monitor = None

    def end(self, status: str = "FINISHED", wait: float | None = None,
            interrupted: Callable[[], bool] | None = None) -> None:
        """Mark the run ``status``; if MLflow is unreachable, keep retrying for ``wait`` seconds.

        ``wait`` defaults to ``flush_timeout``; ``interrupted()`` returning True
        (a signal arrived) ends the wait early.
        """
        if self.run_id is None:
            return
        self._stop_system_metrics()
        self._call("set_terminated", self.run_id, status)
        wait = self.flush_timeout if wait is None else wait
        if self.flush(force=True):
            return
        deadline = time.monotonic() + max(wait, 0.0)
        if wait > 0:
            log.warning("MLflow at %s is unreachable; the checkpoint is written. Waiting up to %.0f s for it to "
                        "send %d queued call(s)", self.uri, wait, len(self._pending))
        while time.monotonic() < deadline and not (interrupted and interrupted()):
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
            if self.flush(force=True):
                return
        self._save_pending()

    def _save_pending(self) -> None:
        """Keep what could not be sent, so no record of the run is lost."""
        out = self.run_dir / "mlflow_pending.json"
        records = [{"method": self._name(m), "args": [repr(a)[:2000] for a in args]} for m, args, _ in self._pending]
        try:
            out.write_text(json.dumps({"run_id": self.run_id, "uri": self.uri, "calls": records}, indent=1))
            log.warning("MLflow unreachable at the end of the run: %d call(s) written to %s", len(records), out)
        except OSError as e:
            log.warning("MLflow unreachable and %s not writable (%s): %d call(s) lost", out, e, len(records))


def make_tracker(cfg: Mapping, run_dir: str | Path, is_root: bool) -> NullTracker:
    """The tracker this rank should use: MLflow on rank 0 when tracking.backend is mlflow.

    If the store cannot be reached, the returned tracker raises `TrackingError`
    from ``start`` rather than here.
    """
    if not is_root or cfg.get("backend", "mlflow") in (None, "none"):
        return NullTracker()
    try:
        return MlflowTracker(cfg.get("uri"), cfg.get("experiment", "dpcnn"), run_dir,
                             flush_timeout=float(cfg.get("flush_timeout", 60.0)),
                             retry_interval=float(cfg.get("retry_interval", 5.0)))
    except TrackingError as e:  # raised by start(), on every rank (see _Unreachable)
        return _Unreachable(e)


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
