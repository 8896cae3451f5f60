"""The tracker's queue, journal and replay, in process (fast): order, spilling, idempotence, the store lock.

The outage tests with a real ``mlflow server`` and real training jobs are in
``test_tracking_outages.py``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dpcnn import journal
from dpcnn.store import TrackingError, open_client
from dpcnn.tracking import MlflowTracker


class FlakyClient:
    """Wraps an MlflowClient; its methods raise ConnectionError while ``down``."""

    def __init__(self, client):
        self.client, self.down, self.calls = client, False, []

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("Connection refused")
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """Creating MLflow's SQLite schema takes seconds: once, copied into each test."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def tracker_on(tmp_path, empty_store, **kw) -> tuple[MlflowTracker, FlakyClient]:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "q", tmp_path / "run", **kw)
    tracker.client = flaky = FlakyClient(tracker.client)
    tracker.start(run_name="q")
    return tracker, flaky


def test_queue_keeps_order_spills_to_the_journal_and_drops_refused_calls(tmp_path, empty_store):
    tracker, flaky = tracker_on(tmp_path, empty_store, retry_interval=0.05, flush_timeout=30, queue_size=4)
    rid, client = tracker.run_id, flaky.client
    tracker.log_params({"a": 1})
    flaky.down = True
    stamps = []
    for step in range(1, 31):  # 30 records while the server is away: 4 in memory, the rest spilled
        tracker.log_metrics({"loss": 1.0 / step}, step)
        stamps.append(json.loads(tracker.journal.path.read_text().splitlines()[-1])["metrics"][0][2])
    assert len(tracker._queue) <= 4 and tracker.unsent >= 30
    flaky.down = False
    tracker.log_params({"a": 2})  # refused by the store (a param cannot change): dropped, not blocking
    tracker.set_tags({"t": "x" * 7000})  # full values: nothing cut (MLflow's own limit is 8,000)
    tracker.end("FINISHED")
    history = client.get_metric_history(rid, "loss")
    assert [m.step for m in history] == list(range(1, 31))  # all of them, in order
    assert [m.timestamp for m in history] == stamps  # the time each point was measured, not sent
    run = client.get_run(rid)
    assert run.data.params["a"] == "1" and run.data.tags["t"] == "x" * 7000 and run.info.status == "FINISHED"
    assert not (tmp_path / "run" / journal.DIR).exists()  # everything sent: no journal left


def test_journal_is_plain_json_and_replay_is_idempotent(tmp_path, empty_store):
    tracker, flaky = tracker_on(tmp_path, empty_store, retry_interval=0.05, flush_timeout=0.5)
    rid, client = tracker.run_id, flaky.client
    (tmp_path / "run" / "f.txt").write_text("hello")
    flaky.down = True
    tracker.log_params({"p": "v" * 5000})
    tracker.set_tags({"long": "t" * 9000})  # kept whole in the journal; MLflow keeps 8,000 characters
    tracker.log_metrics({"m": 0.5, "n": float("nan")}, 3)
    tracker.log_artifact(tmp_path / "run" / "f.txt", "files")
    tracker.log_text("config: 1", "config.yaml")
    tracker.log_table({"class": ["0", "1"], "recall": [0.5, 1.0]}, "table.json")
    tracker.end("KILLED")
    path = tmp_path / "run" / journal.DIR / f"{rid}.json"
    raw = path.read_bytes()
    assert b"pickle" not in raw and b"\x80" not in raw
    doc = json.loads(raw)  # plain json
    assert [r["op"] for r in doc["records"]] == ["params", "tags", "metrics", "artifact", "text", "table", "tags", "end"]
    assert doc["records"][1]["tags"]["long"] == "t" * 9000 and doc["status"] == "KILLED"

    assert journal.main(["replay", str(tmp_path / "run")]) == 0
    run = client.get_run(rid)
    assert run.info.status == "KILLED" and run.data.tags["dpcnn.replayed"] == "true"
    assert run.data.params["p"] == "v" * 5000 and run.data.metrics["m"] == 0.5
    assert {a.path for a in client.list_artifacts(rid, "files")} == {"files/f.txt"}
    def points(key):
        return [(m.step, m.timestamp, repr(m.value)) for m in client.get_metric_history(rid, key)]
    before = (points("m"), points("n"), run.data.tags)
    # A second replay adds nothing (the journal is kept as <run id>.replayed.json).
    assert not path.exists() and (path.parent / f"{rid}.replayed.json").exists()
    assert journal.replay_file(path.parent / f"{rid}.replayed.json") == 0
    run = client.get_run(rid)
    assert (points("m"), points("n"), run.data.tags) == before
    assert {a.path for a in client.list_artifacts(rid)} == {"files", "config.yaml", "table.json"}


def test_killed_writer_leaves_a_replayable_journal(tmp_path, empty_store):
    """A kill -9 leaves the .jsonl write-ahead log; replay sends it and ends the run FAILED."""
    tracker, flaky = tracker_on(tmp_path, empty_store, retry_interval=60)
    rid, client = tracker.run_id, flaky.client
    flaky.down = True
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step)
    live = tracker.journal.path
    with open(live, "a") as f:
        f.write('{"op": "metr')  # the line a killed process was writing
    assert journal.replay_dir(tmp_path / "run") == 1
    run = client.get_run(rid)
    assert [m.step for m in client.get_metric_history(rid, "loss")] == list(range(5))
    assert run.info.status == "FAILED" and "killed" in run.data.tags["dpcnn.failure"]


def test_store_lock_and_repair(tmp_path):
    """Four openers of a fresh SQLite store at once; a half-migrated store is repaired; a broken one is one line."""
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    errors = []

    def open_it():
        try:
            open_client(uri).search_experiments()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    # Half-migrated: the schema of an older revision, with alembic's temporary table left behind.
    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    half = tmp_path / "half.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{half}")
    Base.metadata.create_all(engine)
    config = _get_alembic_config(f"sqlite:///{half}")
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()][::-1]
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revisions[len(revisions) // 2])
    engine.dispose()
    with sqlite3.connect(half) as db:
        db.execute("CREATE TABLE _alembic_tmp_metrics (x INTEGER)")
    client = open_client(f"sqlite:///{half}")
    client.create_experiment("after-repair")
    assert list(tmp_path.glob("half.db.bak-*"))

    broken = tmp_path / "broken.db"
    with sqlite3.connect(broken) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        db.execute("INSERT INTO alembic_version VALUES ('deadbeef')")
        db.execute("CREATE TABLE experiments (x INTEGER)")
    with pytest.raises(TrackingError) as e:
        open_client(f"sqlite:///{broken}")
    assert "half-migrated" in str(e.value) and "mlflow db upgrade" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def global_mlflow_uri_restored():
    """Logging a model sets MLflow's global tracking URI (and $MLFLOW_TRACKING_URI): put it back for later tests."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    yield
    mlflow.set_tracking_uri(before)


def test_model_logged_once_across_a_failed_attempt(tmp_path, empty_store, monkeypatch, global_mlflow_uri_restored):
    """An attempt cut off after the logged model was created: the retry finishes it; one READY model."""
    from mlflow.models import Model as MlflowModel

    from dpcnn.serving import model_spec

    tracker, flaky = tracker_on(tmp_path, empty_store, retry_interval=0.1, flush_timeout=120)
    layers = [{"type": "flatten"}, {"type": "dense", "units": 10}]
    spec = model_spec(layers, (28, 28, 1), 10)
    original, calls = MlflowModel.log, []

    def cut_off(*args, **kwargs):
        calls.append(kwargs.get("model_id"))
        if len(calls) == 1:
            raise ConnectionError("Connection refused")
        return original(*args, **kwargs)
    monkeypatch.setattr(MlflowModel, "log", cut_off)
    tracker.log_model(np.zeros(7850, np.float32), spec, np.zeros((2, 28, 28, 1), np.float32), step=1)
    tracker.end("FINISHED")
    client = flaky.client
    models = client.search_logged_models([tracker.experiment_id])
    assert len(calls) == 2 and calls[0] == calls[1]  # the same model id, finished
    assert [str(m.status) for m in models] == ["READY"]
    assert MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_run_shorter_than_the_sampling_interval_still_has_system_metrics(tmp_path, empty_store):
    """MLflow's sampler publishes only after a full interval; stopped sooner it used to drop its sample,
    and a short run (a test, a fast machine) had no system/* metric at all."""
    tracker, flaky = tracker_on(tmp_path, empty_store)
    tracker.start_system_metrics(interval=60.0)
    tracker.end()
    metrics = flaky.client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
