"""Nothing lost, nothing hangs: exact resume, a killed rank, pre-emption, divergence, bad checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint

from conftest import MPIRUN, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
# 1,000 training images -> 16 steps an epoch; Nesterov (optimizer state) and augmentation
# (per-step randomness) so that resume has to restore all of it.
RECIPE = ["model=tiny", "optimizer=nesterov", "data.train_subset=1000", "data.augment.enabled=true",
          "trainer.epochs=3", "trainer.progress=false"]


def params_of(run_dir: Path) -> np.ndarray:
    return checkpoint.load(run_dir / "checkpoints").params


def straight_run(workdir, n=2, name="straight"):
    run_dir = workdir / name
    check_ok(run_train(n, *RECIPE, "tracking=none", f"hydra.run.dir={run_dir}", cwd=workdir))
    return params_of(run_dir)


@pytest.fixture(scope="module")
def straight_small(tmp_path_factory):
    """Final params of the uninterrupted `small` run that the interrupted ones must reproduce."""
    needs_data()
    workdir = tmp_path_factory.mktemp("straight")
    check_ok(run_train(2, *RECIPE, "model=small", "tracking=none", f"hydra.run.dir={workdir / 'run'}", cwd=workdir))
    return params_of(workdir / "run")


def runs(workdir, experiment):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_exact_resume_mid_epoch_and_across_world_sizes(workdir):
    needs_data()
    ref = straight_run(workdir)
    part = workdir / "part"
    check_ok(run_train(2, *RECIPE, "trainer.max_steps=21", "tracking=none", f"hydra.run.dir={part}", cwd=workdir))
    meta = checkpoint.load(part / "checkpoints").meta
    assert (meta["step"], meta["epoch"], meta["batch"]) == (21, 1, 5)
    # Same world size: bitwise identical.
    check_ok(run_train(2, *RECIPE, "tracking=none", f"trainer.resume={part / 'checkpoints'}",
                       f"hydra.run.dir={workdir / 'resumed2'}", cwd=workdir))
    np.testing.assert_array_equal(params_of(workdir / "resumed2"), ref)
    # 2 -> 4 ranks: the same global batches, only the reduction order differs.
    check_ok(run_train(4, *RECIPE, "tracking=none", f"trainer.resume={part / 'checkpoints' / 'last.npz'}",
                       f"hydra.run.dir={workdir / 'resumed4'}", cwd=workdir))
    assert np.max(np.abs(params_of(workdir / "resumed4") - ref)) <= 1e-4


def rank_pids(marker: str) -> dict[int, int]:
    """pid of each MPI rank whose command line contains ``marker``."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if marker in cmd and "PMI_RANK" in env and "mpirun" not in cmd:
            pids[int(env["PMI_RANK"])] = int(proc.name)
    return pids


def running(pid: int, grace: float) -> bool:
    """Whether ``pid`` is still running after up to ``grace`` seconds (an unreaped zombie has ended)."""
    end = time.monotonic() + max(grace, 0)
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X") or time.monotonic() >= end:
            return state not in ("Z", "X")
        time.sleep(0.1)


def start_stalled_run(workdir, run_dir, stall_step):
    """A 48-step run that checkpoints every 4 steps and holds rank 0 at ``stall_step`` until signalled.

    The run is fast (well under a second of steps), so a test that waited for a checkpoint and then
    signalled would race it; the stall pins the moment the signal or kill arrives.
    """
    cmd = [str(MPIRUN), "-n", "2", sys.executable, "-m", "dpcnn.train", *RECIPE, "model=small",
           "trainer.checkpoint_every=4", "tracking.experiment=rel", f"hydra.run.dir={run_dir}"]
    env = train_env(DPCNN_FAULT=f"rank=0,step={stall_step},action=stall")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, timeout=120):
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_of_one_rank_ends_job_and_resume_recovers(workdir, straight_small):
    needs_data()
    run_dir = workdir / "killed"
    proc = start_stalled_run(workdir, run_dir, stall_step=9)
    wait_for(run_dir / "checkpoints" / "step-00000008.npz", proc)
    pids = rank_pids(str(run_dir))
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    assert not any(running(pid, grace=30 - (time.monotonic() - start)) for pid in pids.values())
    ckpt = checkpoint.load(run_dir / "checkpoints")  # the last checkpoint is intact
    assert ckpt.step == 8
    (crashed,) = runs(workdir, "rel")
    # Resume in the same run dir: continues from the checkpoint and closes the crashed run.
    check_ok(run_train(2, *RECIPE, "model=small", "trainer.checkpoint_every=4", "tracking.experiment=rel",
                       "trainer.resume=auto", f"hydra.run.dir={run_dir}", cwd=workdir))
    old, new = runs(workdir, "rel")
    assert old.info.run_id == crashed.info.run_id and old.info.status == "FAILED"
    assert new.info.status == "FINISHED" and new.data.tags["dpcnn.resumed_from"] == old.info.run_id
    np.testing.assert_array_equal(params_of(run_dir), straight_small)


def test_sigterm_to_mpirun_checkpoints_marks_killed_and_resumes_exactly(workdir, straight_small):
    needs_data()
    run_dir = workdir / "preempted"
    proc = start_stalled_run(workdir, run_dir, stall_step=5)
    wait_for(run_dir / "checkpoints" / "step-00000004.npz", proc)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before pre-emption
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "stopped by signal" in out + err
    # Stopped at the first step boundary after the signal, with a checkpoint of exactly that step: 5 if
    # the signal came while step 5 was computing, 6 if rank 0 was already held in step 6 (never later).
    assert checkpoint.load(run_dir / "checkpoints").step in (5, 6)
    (run,) = runs(workdir, "rel")
    assert run.info.status == "KILLED"
    check_ok(run_train(2, *RECIPE, "model=small", "tracking=none", "trainer.resume=auto",
                       f"hydra.run.dir={run_dir}", cwd=workdir))
    np.testing.assert_array_equal(params_of(run_dir), straight_small)


def test_divergence_stops_every_rank_and_keeps_last_good_checkpoint(workdir):
    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(2, *RECIPE, "trainer.max_steps=5", "tracking=none", f"hydra.run.dir={run_dir}",
                       cwd=workdir))
    good = (run_dir / "checkpoints" / "last.npz").read_bytes()
    proc = run_train(2, *RECIPE, "optimizer.lr=1e6", "trainer.resume=auto", "tracking.experiment=div",
                     f"hydra.run.dir={run_dir}", cwd=workdir, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("training diverged at step") == 2, proc.stderr  # one line on each rank
    assert "lower optimizer.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "last.npz").read_bytes() == good
    (run,) = runs(workdir, "div")
    assert run.info.status == "FAILED"


def test_damaged_checkpoint_on_resume_is_one_line_on_every_rank(workdir):
    needs_data()
    bad = workdir / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = run_train(2, "model=tiny", "tracking=none", f"trainer.resume={bad}", "trainer.progress=false",
                     cwd=workdir, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{bad}: unreadable checkpoint") == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_checkpoint_directory_is_a_clear_error(workdir):
    needs_data()
    run_dir = workdir / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint directory should be")
    proc = run_train(2, "model=tiny", "trainer=debug", "tracking.experiment=w", f"hydra.run.dir={run_dir}",
                     cwd=workdir, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("cannot write checkpoint in") == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (run,) = runs(workdir, "w")
    assert run.info.status == "FAILED"
