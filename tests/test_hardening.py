"""Bad input and awkward timing: every case a one-line error or an honest record, never a hang.

Each test here reproduces a hole an adversarial pass found (issue 14) and asserts
the exit code, the single error line on every rank (no traceback), and for
resumes and run directories that no data is skipped, repeated or cross-written.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint
from dpcnn.errors import EXIT_USAGE

from conftest import MPIRUN, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
QUIET = "trainer.progress=false"


def one_line_per_rank(proc, text, ranks=2):
    assert proc.stderr.count(text) == ranks, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dpcnn: error:")]
    assert len(lines) == ranks, proc.stderr[-3000:]


@pytest.mark.parametrize("override,message", [
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size must be >= 1, got 0"),
    ("trainer.log_every=0", "trainer.log_every must be >= 1, got 0"),
    ("trainer.keep_last=-1", "trainer.keep_last must be >= 0, got -1"),
    ("optimizer.warmup_steps=-5", "optimizer.warmup_steps must be >= 0, got -5"),
    ("optimizer.momentum=abc", "Value 'abc' of type 'str' could not be converted to Float"),
    ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.foo=1", "Key 'foo' not in 'TrainerConf'; valid keys there: epochs,"),
    ("+trainer.foo=1", "trainer.foo is not a dpcnn setting"),
    ("model=nope", "Could not find 'model/nope'; Available options in 'model': lenet5, seed, small, "),
])
def test_config_errors_are_one_line_per_rank_before_any_compute(workdir, override, message):
    start = time.monotonic()
    proc = run_train(2, "model=tiny", override, "tracking=none", QUIET, cwd=workdir, timeout=60)
    assert proc.returncode == EXIT_USAGE
    one_line_per_rank(proc, message)
    assert not (workdir / "outputs").exists() or not list((workdir / "outputs").rglob("*.npz"))
    assert time.monotonic() - start < 30


def test_a_batch_larger_than_the_data_with_drop_last_trains_nothing_so_it_is_an_error(workdir):
    needs_data()
    proc = run_train(2, "model=tiny", "trainer.batch_size=100000", "trainer.drop_last=true", "tracking=none", QUIET,
                     f"hydra.run.dir={workdir / 'run'}", cwd=workdir, timeout=90)
    assert proc.returncode == EXIT_USAGE
    one_line_per_rank(proc, "leaves no whole batch of the 5,000 training examples: nothing would train")
    assert not (workdir / "run" / "checkpoints").exists()  # no checkpoint of random weights


def test_oversized_batch_and_subset_are_warned_with_the_effective_value(workdir):
    needs_data()
    proc = run_train(2, "model=tiny", "trainer.batch_size=100000", "data.train_subset=1000000", "trainer.epochs=1",
                     "tracking=none", QUIET, f"hydra.run.dir={workdir / 'run'}", cwd=workdir, timeout=120)
    check_ok(proc)
    log = (workdir / "run" / "train.log").read_text()
    assert "data.train_subset=1000000 is more than the 5,000 training examples there are: using all 5,000" in log
    assert "trainer.batch_size=100000 is more than the 5,000 training examples: each epoch is one batch of 5,000" in log


@pytest.mark.parametrize("keep", [0, 2])
def test_keep_last_keeps_that_many_step_files_and_last_is_an_independent_copy(workdir, keep):
    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(2, "model=tiny", "trainer.max_steps=12", "trainer.checkpoint_every=3", f"trainer.keep_last={keep}",
                       "tracking=none", QUIET, f"hydra.run.dir={run_dir}", cwd=workdir, timeout=120))
    ckpts = run_dir / "checkpoints"
    steps = [p.name for p in checkpoint.list_steps(ckpts)]
    assert steps == ([] if keep == 0 else ["step-00000009.npz", "step-00000012.npz"])
    assert checkpoint.load(ckpts).step == 12
    for step_file in checkpoint.list_steps(ckpts):
        assert os.stat(step_file).st_ino != os.stat(ckpts / "last.npz").st_ino  # not a hard link
    if keep:  # damage last.npz: the step file still loads, and the error names it as the fallback
        (ckpts / "last.npz").write_bytes(b"garbage")
        with pytest.raises(Exception, match="step-00000012.npz"):
            checkpoint.load(ckpts)
        assert checkpoint.load(ckpts / "step-00000012.npz").step == 12


def test_resume_with_another_batch_size_is_an_error_naming_both_values(workdir):
    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(2, "model=tiny", "trainer.max_steps=40", "tracking=none", QUIET, f"hydra.run.dir={run_dir}",
                       cwd=workdir, timeout=120))
    before = checkpoint.load(run_dir / "checkpoints").params
    proc = run_train(2, "model=tiny", "trainer.batch_size=128", "trainer.resume=auto", "tracking=none", QUIET,
                     f"hydra.run.dir={run_dir}", cwd=workdir, timeout=120)
    assert proc.returncode == EXIT_USAGE
    one_line_per_rank(proc, "was trained with trainer.batch_size=64 (now 128): resuming would skip or repeat images")
    np.testing.assert_array_equal(checkpoint.load(run_dir / "checkpoints").params, before)  # nothing trained


def test_resume_not_strict_restarts_the_interrupted_epoch_and_says_so(workdir):
    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(2, "model=tiny", "trainer.max_steps=40", "tracking=none", QUIET, f"hydra.run.dir={run_dir}",
                       cwd=workdir, timeout=120))
    check_ok(run_train(2, "model=tiny", "trainer.batch_size=128", "trainer.epochs=2", "trainer.resume=auto",
                       "trainer.resume_strict=false", "tracking=none", QUIET, f"hydra.run.dir={run_dir}",
                       cwd=workdir, timeout=120))
    assert "epoch 1 starts again from its first image" in (run_dir / "train.log").read_text()
    meta = checkpoint.load(run_dir / "checkpoints").meta
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 0, 40 + 40)  # 5,000 / 128 -> 40 batches


def test_resuming_a_finished_run_trains_nothing_and_creates_no_run(workdir):
    needs_data()
    run_dir = workdir / "run"
    args = ["model=tiny", "trainer.max_steps=10", "tracking.experiment=done", "tracking.plots=false",
            "tracking.log_model=false", QUIET, f"hydra.run.dir={run_dir}"]
    check_ok(run_train(2, *args, cwd=workdir, timeout=120))
    proc = run_train(2, *args, "trainer.resume=auto", cwd=workdir, timeout=120)
    check_ok(proc)
    assert "nothing to train: the checkpoint is at step 10 of 10" in proc.stderr + proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("done").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_a_second_job_on_the_same_run_dir_stops_naming_the_owner(workdir):
    needs_data()
    run_dir = workdir / "run"
    args = ["model=tiny", "trainer.epochs=1", "tracking=none", QUIET, f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen([str(MPIRUN), "-n", "2", sys.executable, "-m", "dpcnn.train", *args], cwd=workdir,
                             env=train_env(DPCNN_FAULT="rank=0,step=5,action=stall"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = run_dir / ".dpcnn.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        owner = json.loads(lock.read_text())
        second = run_train(2, *args, cwd=workdir, timeout=60)
        assert second.returncode == EXIT_USAGE
        one_line_per_rank(second, f"is in use by pid {owner['pid']} on host {socket.gethostname()}")
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # released from its stall, the first job stops cleanly
        out, err = first.communicate(timeout=60)
    assert first.returncode == 143, err[-3000:]
    assert checkpoint.load(run_dir / "checkpoints").step in (5, 6)  # the first job's, not cross-written
    assert not (run_dir / ".dpcnn.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(workdir):
    needs_data()
    run_dir = workdir / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / ".dpcnn.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                     "started": "earlier"}))
    proc = run_train(2, "model=tiny", "trainer.max_steps=5", "tracking=none", QUIET, f"hydra.run.dir={run_dir}",
                     cwd=workdir, timeout=120)
    check_ok(proc)
    assert f"from pid {dead.pid}" in proc.stderr + (run_dir / "train.log").read_text()


def test_a_non_root_rank_failing_outside_the_step_marks_the_run_failed(workdir):
    needs_data()
    run_dir = workdir / "run"
    proc = run_train(2, "model=tiny", "trainer.epochs=2", "tracking.experiment=evalfail", QUIET,
                     f"hydra.run.dir={run_dir}", cwd=workdir, timeout=120,
                     env=train_env(DPCNN_FAULT="rank=1,step=1,phase=eval"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("dpcnn: error: rank 1 failed: RuntimeError: injected fault on rank 1") == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("evalfail").experiment_id])
    assert run.info.status == "FAILED"


def test_without_checkpoints_no_message_offers_a_checkpoint(workdir):
    needs_data()
    proc = run_train(2, "model=tiny", "trainer.checkpoint=false", "tracking=none", QUIET,
                     f"hydra.run.dir={workdir / 'run'}", cwd=workdir, timeout=120,
                     env=train_env(DPCNN_FAULT="rank=1,step=3"))
    assert proc.returncode == 1
    assert "no checkpoint was written (trainer.checkpoint=false)" in proc.stderr
    assert "resume with" not in proc.stderr and "intact" not in proc.stderr


def test_sigterm_during_the_end_phase_still_finishes_the_record(workdir):
    """Rank 0 is held in its end phase (plots, model); the signal reaches every rank, none dies of it."""
    needs_data()
    run_dir = workdir / "run"
    cmd = [str(MPIRUN), "-n", "2", sys.executable, "-m", "dpcnn.train", "model=tiny", "trainer.max_steps=10",
           "tracking.experiment=endsig", "tracking.plots=false", QUIET, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=train_env(DPCNN_FAULT="rank=0,step=0,action=stall,phase=end"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (run_dir / "checkpoints" / "step-00000010.npz").exists():
            time.sleep(0.1)
        time.sleep(2)  # rank 0 is now held in its end phase, rank 1 waits for it
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("endsig").experiment_id])
    assert run.info.status == "FINISHED"
    assert "checkpoints" in {a.path for a in client.list_artifacts(run.info.run_id)}
    (model,) = client.search_logged_models([run.info.experiment_id])  # the model was logged, once
