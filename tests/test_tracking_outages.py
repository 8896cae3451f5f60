"""Tracking outages with a real ``mlflow server`` on 127.0.0.1 and real training jobs: nothing lost, nothing
duplicated, no training waits. (The time a hung server costs training is measured in bench/bench_tracking.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MPIRUN, check_ok, needs_data, run_train, train_env
from mlflow.tracking import MlflowClient
from test_mlflow import QUIET, free_port, start_server, stop_group

from dpcnn import journal

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
#: A short real run: 2,000 images, 2 epochs of 32 steps, the loss every 5 steps, plots and the model at the end.
ARGS = ["model=tiny", "trainer.epochs=2", "trainer.log_every=5", "data.train_subset=2000",
        "tracking.activation_images=1", "tracking.retry_interval=1", QUIET]
STEPS = 64
#: Metrics whose values are timings (they differ between any two runs); their steps must still match.
TIMINGS = {"img_per_s", "wall_img_per_s", "step_time_s", "epoch_time_s", "elapsed_s", "peak_rss_mb", "allreduce_frac",
           "comm_wait_frac", "comm_transfer_frac"}
LEAN = ["++tracking.plots=false", "++tracking.log_model=false", "++tracking.datasets=false"]


class Server:
    """A real ``mlflow server`` on 127.0.0.1 for one test, with its store in the test's directory."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(root, self.port)

    def kill(self) -> None:
        stop_group(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.proc = start_server(self.root, self.port)

    def signal(self, sig) -> None:
        os.killpg(self.proc.pid, sig)


@pytest.fixture
def server(workdir):
    srv = Server(workdir)
    yield srv
    try:
        srv.signal(signal.SIGCONT)
    except ProcessLookupError:
        pass
    stop_group(srv.proc)


def popen_train(ranks: int, *overrides: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [str(MPIRUN), "-n", str(ranks), sys.executable, "-m", "dpcnn.train", *overrides]
    return subprocess.Popen(cmd, cwd=cwd, env=env or train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the server may be starting or away
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= all_artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def snapshot(client: MlflowClient, run_id: str) -> dict:
    """What a run holds: metric histories (timings by step only), params, tags, artifacts, models, status."""
    run = client.get_run(run_id)
    metrics = {}
    for key in run.data.metrics:
        if not key.startswith("system/"):
            history = client.get_metric_history(run_id, key)
            metrics[key] = [(m.step,) if key in TIMINGS else (m.step, m.value) for m in history]
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    return {"metrics": metrics, "params": {k: v for k, v in run.data.params.items() if k != "tracking.experiment"},
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("dpcnn.final.")},
            "tag_keys": set(run.data.tags) - {"dpcnn.replayed", "mlflow.runName"},
            "artifacts": all_artifacts(client, run_id), "models": [(m.name, str(m.status)) for m in models],
            "status": run.info.status}


def test_server_down_past_the_end_journal_then_replay_equals_an_undisturbed_run(workdir, server):
    """Killed after the run started, down past the end (SIGTERM cuts the end's wait short): exit 0, a complete
    journal; replayed once the server is back, the run equals one that never lost its server; again: no change."""
    needs_data()
    common = [*ARGS, f"tracking.uri={server.uri}", "tracking.flush_timeout=600"]
    check_ok(run_train(2, *common, "tracking.experiment=ref", f"hydra.run.dir={workdir / 'ref'}", cwd=workdir))
    client = MlflowClient(server.uri)
    (ref,) = runs_of(client, "ref")
    run_dir = workdir / "lost"
    train = popen_train(2, *common, "tracking.experiment=lost", f"hydra.run.dir={run_dir}", cwd=workdir)
    wait_for(lambda: runs_of(client, "lost"), 120, "the run to appear", train)
    server.kill()
    # Rank 0 waits at the end for the server (up to 600 s); SIGTERM ends the wait, and the journal is written.
    wait_for(lambda: "waiting up to 600 s" in (run_dir / "train.log").read_text(), 300, "the end's wait", train)
    train.send_signal(signal.SIGTERM)
    _, err = train.communicate(timeout=120)
    assert train.returncode == 0, err[-3000:]
    (path,) = (run_dir / journal.DIR).glob("*.json")
    log = (run_dir / "train.log").read_text()
    assert f"Send them with: python -m dpcnn.tracking replay {run_dir}" in log, log[-2000:]
    # The journal: plain JSON, no pickle; every record of the run, the model's files beside it.
    doc = json.loads(path.read_text())
    assert "pickle" not in path.read_text()
    ops = [r["op"] for r in doc["records"]]
    assert {"params", "tags", "metrics", "text", "inputs", "artifacts", "table", "artifact", "model"} <= set(ops)
    assert ops[-1] == "end" and doc["status"] == "FINISHED"
    steps = sorted({m[3] for r in doc["records"] if r["op"] == "metrics" for m in r["metrics"]
                    if m[0] == "train_loss_step"})
    assert steps == list(range(5, STEPS + 1, 5))
    model = next(r for r in doc["records"] if r["op"] == "model")
    assert (path.parent / model["dir"] / "weights.npz").is_file()

    server.restart()
    replay = [sys.executable, "-m", "dpcnn.tracking", "replay", str(run_dir)]
    check_ok(subprocess.run(replay, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=300))
    (lost,) = runs_of(client, "lost")
    assert lost.data.tags["dpcnn.replayed"] == "true"
    after = snapshot(client, lost.info.run_id)
    assert after == snapshot(client, ref.info.run_id)  # as if the server had never gone away
    assert after["status"] == "FINISHED" and after["models"] == [("model", "READY")]
    second = subprocess.run(replay, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=300)
    check_ok(second)
    assert "nothing sent" in second.stdout, second.stdout
    assert snapshot(client, lost.info.run_id) == after


def test_server_hung_with_sigstop_every_record_arrives(workdir, server):
    """SIGSTOP the server for 30 s once the run exists: the job ends normally, everything arrives after SIGCONT."""
    needs_data()
    run_dir = workdir / "run"
    train = popen_train(2, *ARGS, f"tracking.uri={server.uri}", "tracking.experiment=hung",
                        "tracking.flush_timeout=90", f"hydra.run.dir={run_dir}", cwd=workdir)
    client = MlflowClient(server.uri)
    wait_for(lambda: runs_of(client, "hung"), 120, "the run to appear", train)
    server.signal(signal.SIGSTOP)
    time.sleep(30)
    server.signal(signal.SIGCONT)
    _, err = train.communicate(timeout=300)
    assert train.returncode == 0, err[-3000:]
    (run,) = runs_of(client, "hung")
    snap = snapshot(client, run.info.run_id)
    assert snap["status"] == "FINISHED" and snap["models"] == [("model", "READY")]
    assert [s for s, _ in snap["metrics"]["train_loss_step"]] == list(range(5, STEPS + 1, 5))
    assert [s for s, _ in snap["metrics"]["test_acc"]] == [32, 64]
    assert {"checkpoints/last.npz", "config.yaml", "plots/confusion_matrix.png"} <= snap["artifacts"]
    assert not (run_dir / journal.DIR).exists()


def test_killed_job_and_server_resume_replays_the_earlier_journal(workdir, server):
    needs_data()
    run_dir = workdir / "run"
    common = [*ARGS, f"tracking.uri={server.uri}", "tracking.experiment=k9", "trainer.checkpoint_every=10",
              f"hydra.run.dir={run_dir}"]
    train = popen_train(2, *common, cwd=workdir, env=train_env(DPCNN_FAULT="rank=0,step=40,action=kill"))
    client = MlflowClient(server.uri)
    wait_for(lambda: runs_of(client, "k9"), 120, "the run to appear", train)
    server.kill()
    train.communicate(timeout=300)
    assert train.returncode != 0
    (wal,) = (run_dir / journal.DIR).glob("*.jsonl")  # what the killed rank 0 had written
    server.restart()
    check_ok(run_train(2, *common, "trainer.resume=auto", cwd=workdir))
    runs = {r.info.status: r for r in runs_of(client, "k9")}
    old, new = runs["FAILED"], runs["FINISHED"]
    assert new.data.tags["dpcnn.resumed_from"] == old.info.run_id == wal.stem
    assert old.data.tags["dpcnn.replayed"] == "true" and old.data.params["model.name"] == "tiny"
    assert [m.step for m in client.get_metric_history(old.info.run_id, "train_loss_step")] == list(range(5, 41, 5))
    assert [m.step for m in client.get_metric_history(new.info.run_id, "train_loss_step")] == \
        list(range(45, STEPS + 1, 5))
    assert not journal.find(run_dir) and (run_dir / journal.DIR / f"{wal.stem}.replayed.json").is_file()


def test_sweep_rides_out_an_outage_at_a_trial_boundary(workdir, server):
    """The server dies as trial 0 ends and is back 20 s later: every trial trains, the parent ends FINISHED."""
    needs_data()
    sweep = popen_train(2, "-m", "model=tiny", "trainer=debug", "data.val_fraction=0.1", *LEAN,
                        f"tracking.uri={server.uri}", "tracking.experiment=sw", "tracking.retry_interval=1",
                        "optimizer.lr=0.01,0.05,0.2", QUIET, cwd=workdir)
    client = MlflowClient(server.uri)
    wait_for(lambda: any(r.info.status == "FINISHED" and r.data.tags.get("dpcnn.sweep.trial") == "0"
                         for r in runs_of(client, "sw")), 240, "trial 0 to finish", sweep)
    server.kill()
    time.sleep(20)
    server.restart()
    out, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, err[-3000:]
    assert "best is trial" in out and "waiting up to" in err + out, (out[-2000:], err[-2000:])
    runs = runs_of(client, "sw")
    parents = [r for r in runs if r.data.tags.get("dpcnn.sweep.role") == "parent"]
    children = [r for r in runs if r not in parents]
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(r.data.tags["dpcnn.sweep.trial"] for r in children) == ["0", "1", "2"]
    assert {r.info.status for r in children} == {"FINISHED"}


def test_sweep_whose_server_stays_away_reports_no_best_and_exits_1(workdir, server):
    """Trial 1 cannot start (the server is gone): no "best" of the survivors, exit 1; the parent, replayed, FAILED."""
    needs_data()
    sweep = popen_train(2, "-m", "model=tiny", "trainer=debug", "data.val_fraction=0.1", *LEAN,
                        f"tracking.uri={server.uri}", "tracking.experiment=gone", "tracking.retry_interval=1",
                        "tracking.trial_wait=2", "tracking.flush_timeout=2", "optimizer.lr=0.01,0.05", QUIET,
                        cwd=workdir, env=train_env(DPCNN_RUN_STAMP="s"))
    client = MlflowClient(server.uri)
    wait_for(lambda: any(r.info.status == "FINISHED" and r.data.tags.get("dpcnn.sweep.trial") == "0"
                         for r in runs_of(client, "gone")), 240, "trial 0 to finish", sweep)
    server.kill()
    out, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 1, err[-3000:]
    assert "sweep incomplete: trial(s) 1 of 2" in err and "best is" not in out, (out[-2000:], err[-2000:])
    server.restart()
    replay = [sys.executable, "-m", "dpcnn.tracking", "replay", str(workdir / "multirun" / "s")]
    check_ok(subprocess.run(replay, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=300))
    (parent,) = [r for r in runs_of(client, "gone") if r.data.tags.get("dpcnn.sweep.role") == "parent"]
    assert parent.info.status == "FAILED" and parent.data.tags["dpcnn.sweep.infra_failed"] == "1"


def test_four_jobs_at_once_on_a_fresh_sqlite_store(workdir):
    needs_data()
    cmd = [sys.executable, "-m", "dpcnn.train", "model=tiny", "trainer=debug", *LEAN, QUIET]
    jobs = [subprocess.Popen([*cmd, f"hydra.run.dir={workdir / f'run{i}'}"], cwd=workdir, env=train_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    check_ok(run_train(0, "model=tiny", "trainer=debug", *LEAN, QUIET, f"hydra.run.dir={workdir / 'later'}",
                       cwd=workdir))
    runs = runs_of(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), "dpcnn")
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.parametrize("uri", ["foo://bar", "file:///", "sqlite:///notes.txt", "http://127.0.0.1:{port}"])
def test_bad_uri_or_unreachable_server_is_one_line_within_seconds(workdir, uri):
    needs_data()
    (workdir / "notes.txt").write_text("not a database\n")
    uri = uri.format(port=free_port())
    for cmd in ([sys.executable, "-m", "dpcnn.train", "model=tiny", "trainer=debug", f"tracking.uri={uri}", QUIET],
                [sys.executable, "-m", "dpcnn.predict", "model=runs:/abc/model", "images=x.png", f"tracking_uri={uri}"],
                [sys.executable, "-m", "dpcnn.viz", "run_id=abc", f"tracking_uri={uri}"]):
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, (cmd, proc.stderr)
        assert took < 10, (cmd, took)
