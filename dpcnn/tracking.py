"""MLflow on rank 0, a no-op everywhere else; training never waits for it.

``MlflowClient`` with an explicit run id: sweeps and nested runs cannot get crossed. **Never blocks.** Every call (params, metric points stamped with their own
step and time, tags, artifacts, texts, tables, dataset inputs, the model, the
final status) becomes a plain JSON record, is appended to the run's journal
(`dpcnn.journal`, a file in the run directory) and handed to one background
thread that sends the records in order; the caller returns at once. The
in-memory queue holds at most ``tracking.queue_size`` records; past that the
records wait in the journal on disk (spilled, never dropped) and the worker
reads them back in order. While the server is away the worker retries every
``tracking.retry_interval`` s and says so once; a record the server *refuses*
(a bad parameter, say) is dropped with a warning instead of blocking the rest.

**Never loses a record.** At the end (`MlflowTracker.end`) the run waits up to
``tracking.flush_timeout`` s for the queue to drain (less if a signal says
stop); what could not be sent stays in ``<run dir>/mlflow_journal/<run id>.json``
and one line gives the command that sends it later, idempotently:
``python -m dpcnn.tracking replay <run dir>``. A run resumed in the same run
directory replays earlier journals first. System metrics (MLflow's own sampler) are not journaled.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import journal as journal_mod
from .replay import dataset_record, send
from .system_metrics import finish_sampler
from .store import (TrackingError, check_uri, create_run_once, default_uri, experiment_id, open_client, probe,
                    retry, transient, unreachable, why)
from .tracking_inputs import array_digest, dataset_input, flatten  # noqa: F401 - dpcnn.tracking's names too

log = logging.getLogger(__name__)

TERMINAL = ("FINISHED", "FAILED", "KILLED")
#: Set by the sweep's callback (dpcnn.sweep.record), read by `MlflowTracker.start`: parent run id, tags (JSON).
ENV_PARENT = "DPCNN_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "DPCNN_MLFLOW_TAGS"


class _Unreachable:
    """Stands in for a tracker whose store could not be reached: `start` raises the error.

    Raised at construction it would stop rank 0 alone; raised from ``start`` (which the trainer
    runs under `agree`), every rank stops with the same one-line error.
    """

    enabled = True
    run_id = None

    def __init__(self, error: Exception):
        self.error = error

    def start(self, *args, **kwargs):
        raise self.error

    def __getattr__(self, name):  # anything else: a no-op (never reached before start)
        return lambda *args, **kwargs: None


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

    def log_model(self, params, spec, example, step=0, registered_model_name=None):
        pass

    def start_system_metrics(self, interval=10.0):
        pass

    def end(self, status="FINISHED", wait=None, interrupted=None):
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, written through a journal and a background worker that rides out server outages."""

    enabled = True

    def __init__(self, uri: str | None, experiment: str, run_dir: str | Path, *, flush_timeout: float = 60.0,
                 retry_interval: float = 5.0, queue_size: int = 10000, start_wait: float = 0.0):
        """``start_wait``: how long the start waits for an unreachable server (0: fail at once)."""
        self.uri, self.run_dir = uri or default_uri(), Path(run_dir)
        self.flush_timeout, self.retry_interval = float(flush_timeout), float(retry_interval)
        self.queue_size, self.start_wait = max(int(queue_size), 1), float(start_wait)
        try:  # nothing listening: fail (or wait) at once, before the seconds of importing MLflow
            retry(lambda: probe(check_uri(self.uri)), "the start of the run", self.start_wait, self.uri)
        except ConnectionError as e:
            raise unreachable(self.uri, e) from None
        self.client = open_client(self.uri)  # TrackingError (one line) for a bad URI or store
        try:
            self.experiment_id = retry(lambda: experiment_id(self.client, experiment), "the start of the run",
                                       self.start_wait, self.uri)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            raise unreachable(self.uri, e) from None
        self.run_id: str | None = None
        self.journal: journal_mod.Journal | None = None
        self._queue: deque[dict] = deque()
        self._cond = threading.Condition()
        self._next = 0             # number of the first record not in memory yet (records >= it are on disk)
        self._sent = 0             # records before this one are done (sent, or refused and dropped)
        self._stop, self._down_since, self._spilled_warned = False, None, False
        self.blocked_s = 0.0       # time the callers spent in the tracker (journal write + queue), for the record
        self._worker, self._monitor = None, None  # the sending thread; MLflow's system-metrics sampler

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
        self._replay_earlier()
        try:
            key = uuid.uuid4().hex  # a retried create_run finds the run an earlier attempt made
            run = retry(lambda: create_run_once(self.client, self.experiment_id, run_name, tags, key),
                        "the start of the run", self.start_wait, self.uri)
        except Exception as e:  # noqa: BLE001
            if transient(e):
                raise unreachable(self.uri, e) from None
            raise TrackingError(f"MLflow at {self.uri} refused to create a run ({why(e)}); fix tracking.uri or "
                                "run with tracking=none") from None
        return self.attach(run.info.run_id)

    def attach(self, run_id: str) -> str:
        """Write to an existing run (the sweep's parent) through the journal and the worker."""
        self.run_id = run_id
        self.journal = journal_mod.Journal(self.run_dir, run_id, self.uri, self.experiment_id)
        self._worker = threading.Thread(target=self._work, name="dpcnn-mlflow", daemon=True)
        self._worker.start()
        return run_id

    def _replay_earlier(self) -> None:
        """Journals an earlier run left in this run directory (a resumed run): sent first, idempotently."""
        try:
            journal_mod.replay_dir(self.run_dir, self.uri, client=self.client)
        except Exception as e:  # noqa: BLE001 - the journal stays; training goes on
            log.warning("could not replay the earlier MLflow journal in %s (%s); send it later with: %s %s",
                        self.run_dir / journal_mod.DIR, why(e), journal_mod.COMMAND, self.run_dir)

    # --- the queue -----------------------------------------------------------
    def _submit(self, record: dict) -> None:
        """Journal ``record`` and queue it; never waits for the network."""
        if self.journal is None:
            return
        t0 = time.perf_counter()
        with self._cond:  # numbered and queued under one lock, so the worker sees them in order
            record["seq"] = seq = self.journal.append(record)
            if self._next == seq and len(self._queue) < self.queue_size:
                self._queue.append(record)
                self._next = seq + 1
            elif not self._spilled_warned and self._next == seq:
                self._spilled_warned = True
                log.warning("MLflow queue full (%d records, tracking.queue_size): further records wait in %s "
                            "and are sent in order", self.queue_size, self.journal.path)
            self._cond.notify()
        self.blocked_s += time.perf_counter() - t0

    def _head(self) -> dict | None:
        """The next record to send (reading spilled ones back from the journal); None when stopping."""
        with self._cond:
            while True:
                if self._stop:
                    return None
                if not self._queue and self._next < self.journal.count:
                    records = self.journal.read(self._next, self.queue_size)
                    self._queue.extend(records)
                    self._next = records[-1]["seq"] + 1 if records else self.journal.count
                if self._queue:
                    return self._queue[0]
                self._cond.wait()

    def _work(self) -> None:
        """The worker thread: send records in order, retry while the server is away."""
        base = self.journal.dir
        while True:
            record = self._head()
            if record is None:
                return
            try:
                send(self.client, self.run_id, self.experiment_id, record, base)
            except Exception as e:  # noqa: BLE001
                if transient(e):
                    self._outage(record, e)
                    with self._cond:
                        if self._cond.wait_for(lambda: self._stop, timeout=self.retry_interval):
                            return
                    continue
                log.warning("MLflow refused a %s record and it is dropped (%s)", record["op"], why(e))
            with self._cond:
                self._queue.popleft()
                self._sent = record["seq"] + 1
                self._cond.notify_all()
            if self._down_since is not None:
                log.warning("MLflow is reachable again (%s, after %.0f s); sending the queued records", self.uri,
                            time.monotonic() - self._down_since)
                self._down_since = None

    def _outage(self, record: dict, e: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("MLflow call %s to %s failed (%s); training continues, records are queued and retried "
                        "every %g s", record["op"], self.uri, why(e), self.retry_interval)

    @property
    def unsent(self) -> int:
        return (self.journal.count - self._sent) if self.journal is not None else 0

    # --- what the run records ------------------------------------------------
    def log_params(self, params: Mapping[str, object]) -> None:
        self._submit({"op": "params", "params": {str(k): str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._submit({"op": "metrics", "metrics": [[k, float(v), now, int(step)] for k, v in metrics.items()]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._submit({"op": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, name: str) -> None:
        self._submit({"op": "text", "text": text, "name": name})

    def log_artifacts(self, local_dir, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifacts", "dir": str(Path(local_dir).resolve()), "artifact_path": artifact_path})

    def log_inputs(self, datasets: Sequence) -> None:
        """Datasets as run inputs (see `dataset_input`): the UI lists them with the run."""
        if datasets:
            self._submit({"op": "inputs", "datasets": [dataset_record(d) for d in datasets]})

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A dict of columns as a table artifact the UI can display and compare."""
        self._submit({"op": "table", "data": {str(k): list(v) for k, v in data.items()},
                      "artifact_file": artifact_file})

    def log_model(self, params, spec: Mapping, example, step: int = 0,
                  registered_model_name: str | None = None) -> None:
        """The network as the pyfunc model ``model``: its files wait in the journal folder until logged."""
        import numpy as np

        if self.journal is None:
            return
        folder = self.journal.model_dir()
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "weights.npz", params=np.asarray(params))
        (folder / "spec.json").write_text(json.dumps(dict(spec), indent=1))
        self._submit({"op": "model", "name": "model", "dir": folder.name, "step": int(step),
                      "example": np.asarray(example, np.float32).tolist(),
                      "registered_model_name": registered_model_name})

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
            finish_sampler(self._monitor)
            self._monitor = None

    def end(self, status: str = "FINISHED", wait: float | None = None,
            interrupted: Callable[[], bool] | None = None) -> None:
        """Mark the run ``status`` and wait for the queue to drain: as long as the server answers, and up to
        ``wait`` s (default ``flush_timeout``) of it not answering, which ``interrupted()`` (a signal) cuts
        short. What was not sent stays in the journal."""
        if self.run_id is None or self.journal is None:
            return
        self._stop_system_metrics()
        self.set_tags({"dpcnn.tracking.blocked_s": f"{self.blocked_s:.4f}"})  # what tracking cost the caller
        self._submit({"op": "end", "status": status, "end_time": int(time.time() * 1000)})
        wait = self.flush_timeout if wait is None else wait
        deadline, said = time.monotonic() + max(wait, 0.0), False
        with self._cond:
            while self.unsent and time.monotonic() < deadline:
                down = self._down_since is not None
                if not down:  # a slow but healthy server (logging the model, say) is waited for, signal or not
                    deadline = max(deadline, time.monotonic() + max(wait, 0.0))
                elif interrupted and interrupted():  # a signal: no waiting for a server that is away
                    break
                if not said and down and wait > 0:
                    log.warning("MLflow at %s is unreachable; waiting up to %g s to send %d record(s)", self.uri,
                                wait, self.unsent)
                    said = True
                self._cond.wait(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
            self._stop = True
            self._cond.notify_all()
        unsent, journal, self.journal = self.unsent, self.journal, None
        self._finish_journal(journal, unsent, status)

    def _finish_journal(self, journal: journal_mod.Journal, unsent: int, status: str) -> None:
        try:
            path = journal.close(unsent, status)
        except OSError as e:
            log.warning("MLflow: %d record(s) of run %s were not sent and the journal could not be written "
                        "(%s)", unsent, self.run_id, e)
            return
        if path is not None:
            log.warning("MLflow at %s did not take %d record(s) of run %s (%s); they are in %s. Send them with: "
                        "%s %s", self.uri, unsent, self.run_id, status, path, journal_mod.COMMAND, self.run_dir)


def make_tracker(cfg: Mapping, run_dir: str | Path, is_root: bool) -> NullTracker:
    """The tracker this rank should use: MLflow on rank 0 when tracking.backend is mlflow.

    If the store cannot be reached, the returned tracker raises `TrackingError`
    from ``start`` rather than here. A sweep's trial (a parent run is set) waits up
    to ``tracking.trial_wait`` s for an unreachable server; a plain run fails at once.
    """
    if not is_root or cfg.get("backend", "mlflow") in (None, "none"):
        return NullTracker()
    try:
        return MlflowTracker(cfg.get("uri"), cfg.get("experiment", "dpcnn"), run_dir,
                             flush_timeout=float(cfg.get("flush_timeout", 60.0)),
                             retry_interval=float(cfg.get("retry_interval", 5.0)),
                             queue_size=int(cfg.get("queue_size", 10000)),
                             start_wait=float(cfg.get("trial_wait", 120.0)) if os.environ.get(ENV_PARENT) else 0.0)
    except TrackingError as e:  # raised by start(), on every rank (see _Unreachable)
        return _Unreachable(e)


def mark_run(uri: str | None, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> bool:
    """End another run (e.g. one left RUNNING by a killed job) if it is still running."""
    try:
        client = open_client(uri)
        run = client.get_run(run_id)
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        if run.info.status not in TERMINAL:
            client.set_terminated(run_id, status)
            return True
    except Exception as e:  # noqa: BLE001
        log.warning("could not update MLflow run %s: %s", run_id, why(e))
    return False


if __name__ == "__main__":  # python -m dpcnn.tracking replay <run dir>
    sys.exit(journal_mod.main())
