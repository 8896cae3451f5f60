"""A rank that is alive but stuck, and restarts without a scheduler (issue 16).

A rank is made truly stuck the way a dead NFS mount or a swapping node makes it:
it is held at a known point by the fault hook (``action=stall``), then stopped
with SIGSTOP, so it answers nothing, not even a signal. The other ranks'
watchdog must name it, end the job and leave the checkpoint loadable.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpcnn import checkpoint

from conftest import MPIRUN, REPO, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
FAST = ["trainer.progress=false", "trainer.stall_warning=5", "trainer.collective_timeout=15",
        "trainer.setup_timeout=15"]


def rank_pid(run_dir: Path, rank: int, timeout: float = 60) -> int:
    """The pid of ``rank`` of the job writing ``run_dir`` (MPICH puts PMI_RANK in each rank's environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes()
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"dpcnn.train" in cmd and str(run_dir).encode() in cmd and f"PMI_RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} of {run_dir} not found")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except OSError:
        return False


def start(ranks, run_dir, *overrides, fault):
    cmd = [str(MPIRUN), "-n", str(ranks), sys.executable, "-m", "dpcnn.train", "model=tiny", "trainer.epochs=20",
           "tracking=none", f"hydra.run.dir={run_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=train_env(DPCNN_FAULT=fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_file(path: Path, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def stop_rank_and_wait(proc, run_dir: Path, rank: int, ready: Path) -> tuple[str, float, int]:
    """Once ``ready`` exists, SIGSTOP ``rank``; returns (stderr, seconds until the job ended, its pid)."""
    try:
        wait_file(ready, proc)
        pid = rank_pid(run_dir, rank)
        time.sleep(1)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
        return err, time.monotonic() - stopped_at, pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_stopped_rank_is_named_and_the_job_ends(workdir, ranks):
    needs_data()
    run_dir, stuck = workdir / "run", ranks - 1
    proc = start(ranks, run_dir, "trainer.checkpoint_every=5", fault=f"rank={stuck},step=10,action=stall")
    err, ended, pid = stop_rank_and_wait(proc, run_dir, stuck, run_dir / "checkpoints" / "step-00000010.npz")
    assert proc.returncode != 0 and ended < 45, (proc.returncode, ended, err[-3000:])
    assert f"dpcnn: warning: rank {stuck} (host " in err and "has not reached step 10 for 5 s" in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("dpcnn: error:")]
    assert lines and all(f"rank {stuck} (host " in ln and "has not reached step 10 for 15 s" in ln for ln in lines)
    assert "resume with trainer.resume=auto" in lines[0]
    time.sleep(1)
    assert not alive(pid)  # no rank is left behind, the stopped one included
    assert checkpoint.load(run_dir / "checkpoints").step == 10


def test_a_rank_stopped_during_setup_ends_the_job(workdir):
    needs_data()
    run_dir = workdir / "run"
    proc = start(2, run_dir, fault="rank=1,phase=setup,action=stall")
    err, ended, pid = stop_rank_and_wait(proc, run_dir, 1, run_dir / ".dpcnn.lock")
    assert proc.returncode != 0 and ended < 45, (proc.returncode, ended, err[-3000:])
    assert "dpcnn: error: rank 1 (host " in err and "has not reached the set-up collective" in err, err[-3000:]
    time.sleep(1)
    assert not alive(pid)


def launch_local(*args, env):
    return subprocess.run(["bash", str(REPO / "launch" / "local.sh"), *args], cwd=env["WORKDIR"], env=env,
                          capture_output=True, text=True, timeout=300)


def test_local_sh_restarts_after_a_killed_rank_and_ends_bitwise_equal(workdir):
    needs_data()
    common = ["model=tiny", "trainer.epochs=2", "trainer.checkpoint_every=20", "tracking=none",
              "trainer.progress=false"]
    check_ok(run_train(2, *common, f"hydra.run.dir={workdir / 'straight'}", cwd=workdir))
    env = train_env(WORKDIR=workdir, PYTHON=sys.executable, DPCNN_FAULT="rank=1,step=50,action=kill,attempt=0")
    proc = launch_local("--max-restarts", "2", "2", *common, f"hydra.run.dir={workdir / 'healed'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("dpcnn launch: the job failed") == 1, proc.stderr[-3000:]
    assert "restart 1 of 2" in proc.stderr and "trainer.resume=auto" in proc.stderr
    straight = checkpoint.load(workdir / "straight" / "checkpoints")
    healed = checkpoint.load(workdir / "healed" / "checkpoints")
    assert healed.step == straight.step == 2 * 79
    np.testing.assert_array_equal(healed.params, straight.params)


def test_local_sh_does_not_restart_a_config_error(workdir):
    env = train_env(WORKDIR=workdir, PYTHON=sys.executable)
    proc = launch_local("--max-restarts", "2", "2", "model=tiny", "trainer.epochs=0", "tracking=none", env=env)
    assert proc.returncode == 2
    assert "trainer.epochs must be >= 1" in proc.stderr and "restart" not in proc.stderr
