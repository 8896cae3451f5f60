"""launch/: local.sh, multihost.sh and slurm.sbatch, each run for real as far as one machine allows.

The scripts get PYTHON and MPIRUN from the interpreter running the tests. A
wrapper in place of PYTHON records what every rank sees (its environment and
the hydra proxy that started it) and then runs the real interpreter.

The Slurm tests need a cluster that answers: on Debian, as root,
``apt-get install -y slurm-wlm && launch/slurm-localhost.sh``, then
``pytest -m slurm tests/test_launch.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpcnn import checkpoint

from conftest import MPIRUN, REPO, check_ok, needs_data, train_env

LAUNCH = REPO / "launch"
TINY = ["model=tiny", "trainer=debug", "tracking=none"]  # 20 steps of a 2k-parameter model
DEBUG_STEPS = 20


def launch_env(**extra) -> dict:
    """Environment for a launch script: explicit PYTHON/MPIRUN, and BLAS threads NOT pinned by the caller."""
    return train_env(**{"PYTHON": sys.executable, "MPIRUN": MPIRUN, "OMP_NUM_THREADS": 3,
                        "OPENBLAS_NUM_THREADS": 3, "MKL_NUM_THREADS": 3, **extra})


def recording_python(tmp_path: Path) -> Path:
    """A PYTHON for the scripts that writes each rank's environment and parent command line to files."""
    record = tmp_path / "ranks"
    record.mkdir()
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
env > "{record}/env.$PMI_RANK"
tr '\\0' ' ' < /proc/$PPID/cmdline > "{record}/parent.$PMI_RANK"
exec "{sys.executable}" "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def env_file(path: Path) -> dict[str, str]:
    """The variables in the output of `env` saved to ``path``."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def rank_records(tmp_path: Path) -> dict[int, tuple[dict, str]]:
    out = {}
    for f in (tmp_path / "ranks").glob("env.*"):
        rank = int(f.suffix[1:])
        env = env_file(f)
        out[rank] = env, (tmp_path / "ranks" / f"parent.{rank}").read_text()
    return out


def run_script(args: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_trained(run_dir: Path, steps: int = DEBUG_STEPS) -> None:
    ckpt = checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)
    assert ckpt.step == steps, ckpt.meta
    assert (run_dir / "checkpoints" / f"step-{steps:08d}.npz").is_file()


# ------------------------------------------------------------------------- local.sh

@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])  # 3: more ranks than this machine's 2 cores, with no extra flag
def test_local_sh_runs_n_ranks_pins_blas_and_passes_overrides(tmp_path, ranks):
    needs_data()
    python = recording_python(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_script([LAUNCH / "local.sh", ranks, *TINY, f"hydra.run.dir={run_dir}"],
                      launch_env(PYTHON=python), cwd=tmp_path)
    check_ok(proc)
    assert_trained(run_dir)
    assert "dpcnn.train" in proc.stderr.splitlines()[0] and str(MPIRUN) in proc.stderr.splitlines()[0]
    seen = rank_records(tmp_path)
    assert sorted(seen) == list(range(ranks))
    for env, _ in seen.values():
        assert env["PMI_SIZE"] == str(ranks)
        assert (env["OMP_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("1", "1", "1")
        assert str(REPO) in env["PYTHONPATH"].split(":")


# -------------------------------------------------------------------- multihost.sh

@pytest.mark.mpi
def test_multihost_sh_hostfile_naming_this_machine_twice(tmp_path):
    """Two "hosts" of one slot each: one rank per host line, each under its own hydra proxy."""
    needs_data()
    python = recording_python(tmp_path)
    hosts = tmp_path / "hosts"
    hosts.write_text("# this machine under two names\nlocalhost:1\n127.0.0.1:1\n")
    run_dir = tmp_path / "run"
    # The default launcher (ssh): MPICH starts proxies for local names without ssh.
    proc = run_script([LAUNCH / "multihost.sh", hosts, 2, *TINY, f"hydra.run.dir={run_dir}"],
                      launch_env(PYTHON=python), cwd=tmp_path)
    check_ok(proc)
    assert_trained(run_dir)
    ranks = rank_records(tmp_path)
    assert sorted(ranks) == [0, 1]
    proxies = {rank: re.search(r"--proxy-id (\d+)", parent).group(1) for rank, (_, parent) in ranks.items()}
    assert proxies == {0: "0", 1: "1"}, proxies
    for env, _ in ranks.values():
        assert env["OMP_NUM_THREADS"] == "1" and env["DPCNN_DATA_DIR"] == train_env()["DPCNN_DATA_DIR"]


def test_multihost_sh_usage_errors(tmp_path):
    env = launch_env()
    proc = run_script([LAUNCH / "multihost.sh", tmp_path / "missing", 2], env, cwd=tmp_path)
    assert proc.returncode == 2 and "hostfile" in proc.stderr and "not found" in proc.stderr
    (tmp_path / "hosts").write_text("localhost:1\n")
    proc = run_script([LAUNCH / "multihost.sh", tmp_path / "hosts", "two"], env, cwd=tmp_path)
    assert proc.returncode == 2 and "positive number of ranks" in proc.stderr


# ------------------------------------------- how the scripts find python and mpirun

def fake_mpirun(path: Path, version: str) -> Path:
    """An mpirun that answers --version like the real one and records its arguments and environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/bin/sh
if [ "$1" = --version ]; then echo "{version}"; exit 0; fi
printf '%s\\n' "$@" > "$(dirname "$0")/args"
env > "$(dirname "$0")/env"
""")
    path.chmod(0o755)
    return path


def recorded_args(mpirun: Path) -> list[str]:
    return (mpirun.parent / "args").read_text().splitlines()


def recorded_env(mpirun: Path) -> dict[str, str]:
    return env_file(mpirun.parent / "env")


def no_launcher_env(**extra) -> dict:
    env = {k: v for k, v in train_env().items() if k not in ("PYTHON", "MPIRUN", "VIRTUAL_ENV")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_found_in_active_virtualenv(tmp_path):
    venv = tmp_path / "venv"
    mpirun = fake_mpirun(venv / "bin" / "mpirun", "HYDRA build details:")
    (venv / "bin" / "python").symlink_to(sys.executable)
    proc = run_script([LAUNCH / "local.sh", 3, "model=lenet5"], no_launcher_env(VIRTUAL_ENV=venv), cwd=tmp_path)
    check_ok(proc)
    args = recorded_args(mpirun)
    assert args[:2] == ["-n", "3"]
    assert args[-4:] == [str(venv / "bin" / "python"), "-m", "dpcnn.train", "model=lenet5"]
    assert "-genv" in args and "OMP_NUM_THREADS" in args


def test_mpirun_next_to_python_and_overrides(tmp_path):
    """PYTHON picks the environment and mpirun is taken from beside it; MPIRUN wins over both."""
    bindir = tmp_path / "env" / "bin"
    mpirun = fake_mpirun(bindir / "mpirun", "HYDRA build details:")
    (bindir / "python").symlink_to(sys.executable)
    env = no_launcher_env(PYTHON=bindir / "python", VIRTUAL_ENV=tmp_path / "elsewhere")
    check_ok(run_script([LAUNCH / "local.sh", 2], env, cwd=tmp_path))
    assert recorded_args(mpirun)[-3:] == [str(bindir / "python"), "-m", "dpcnn.train"]
    other = fake_mpirun(tmp_path / "other" / "mpirun", "HYDRA build details:")
    check_ok(run_script([LAUNCH / "local.sh", 2], {**env, "MPIRUN": str(other)}, cwd=tmp_path))
    assert recorded_args(other)[:2] == ["-n", "2"]


def test_default_ranks_is_the_number_of_cores(tmp_path):
    mpirun = fake_mpirun(tmp_path / "bin" / "mpirun", "HYDRA build details:")
    env = no_launcher_env(PYTHON=sys.executable, MPIRUN=mpirun)
    check_ok(run_script([LAUNCH / "local.sh", "trainer.epochs=2"], env, cwd=tmp_path))
    args = recorded_args(mpirun)
    assert env["OMP_NUM_THREADS"] == "1"  # which GNU nproc would report instead of the cores
    assert args[:2] == ["-n", str(len(os.sched_getaffinity(0)))] and args[-1] == "trainer.epochs=2"


def test_multihost_sh_makes_mpich_sum_in_a_ring_below_8_ranks_that_are_no_power_of_two(tmp_path):
    """At 3, 5, 6, 7 ranks MPICH's Allreduce folds the extra ranks into partners, whose links carry twice
    the gradient; multihost.sh has it use its ring there (measured: 3 hosts at 1 Gbit/s 1.3-1.5x faster),
    leaves powers of two and 8+ ranks to MPICH, and a value the user set wins."""
    mpirun = fake_mpirun(tmp_path / "bin" / "mpirun", "HYDRA build details:")
    (tmp_path / "hosts").write_text("node1:4\nnode2:4\n")
    names = ("MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM", "MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM")

    def algorithms(np_: int, **extra) -> tuple:
        env = {k: v for k, v in no_launcher_env(PYTHON=sys.executable, MPIRUN=mpirun, **extra).items()
               if k not in names or k in extra}  # (not from the shell running the tests)
        check_ok(run_script([LAUNCH / "multihost.sh", tmp_path / "hosts", np_], env, cwd=tmp_path))
        return tuple(recorded_env(mpirun).get(name) for name in names)

    for np_ in (3, 5, 6, 7):
        assert algorithms(np_) == ("ring", "tsp_ring"), np_
    for np_ in (1, 2, 4, 8, 12):
        assert algorithms(np_) == (None, None), np_
    assert algorithms(3, MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM="sched_naive") == ("ring", "sched_naive")


def test_open_mpi_flags(tmp_path):
    """Open MPI's mpirun spells things differently: -x VAR, --hostfile, --oversubscribe."""
    mpirun = fake_mpirun(tmp_path / "bin" / "mpirun", "mpirun (Open MPI) 5.0.6")
    env = no_launcher_env(PYTHON=sys.executable, MPIRUN=mpirun)
    check_ok(run_script([LAUNCH / "local.sh", 64], env, cwd=tmp_path))
    args = recorded_args(mpirun)
    assert "--oversubscribe" in args and "-genv" not in args
    assert args[args.index("-x") + 1] == "OMP_NUM_THREADS"
    (tmp_path / "hosts").write_text("node1 slots=2\n")
    check_ok(run_script([LAUNCH / "multihost.sh", tmp_path / "hosts", 2], env, cwd=tmp_path))
    args = recorded_args(mpirun)
    assert args[args.index("--hostfile") + 1] == str(tmp_path / "hosts") and "-f" not in args
    assert "DPCNN_DATA_DIR" in args and "-launcher" not in args


def test_missing_mpirun_is_a_clear_error(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = no_launcher_env(PYTHON=bindir / "python", PATH=f"{bindir}:/usr/bin:/bin")
    if shutil.which("mpirun", path=env["PATH"]):
        pytest.skip("a system mpirun is on /usr/bin")
    proc = run_script([LAUNCH / "local.sh", 2], env, cwd=tmp_path)
    assert proc.returncode == 2 and "no mpirun found" in proc.stderr and "MPIRUN=" in proc.stderr


# ------------------------------------------------------------------------------ Slurm

def slurm_answers() -> bool:
    if not all(shutil.which(tool) for tool in ("sbatch", "sinfo", "scontrol", "squeue", "scancel")):
        return False
    try:  # `scontrol ping` fails at once when no controller runs (sinfo retries for seconds)
        return all(subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
                   for cmd in (["scontrol", "ping"], ["sinfo", "-h"]))
    except (OSError, subprocess.TimeoutExpired):
        return False


slurm = pytest.mark.skipif(not slurm_answers(), reason="no Slurm cluster answers (sbatch/sinfo); "
                           "apt-get install -y slurm-wlm && launch/slurm-localhost.sh")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


class Job:
    """One sbatch submission of launch/slurm.sbatch, 2 ranks on one node, run from ``cwd``."""

    def __init__(self, cwd: Path, *overrides: str, launch: str = "mpirun"):
        self.cwd = cwd
        env = train_env(PYTHON=sys.executable, MPIRUN=MPIRUN, DPCNN_REPO=REPO, LAUNCH=launch)
        proc = run_script(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--time=10",
                           LAUNCH / "slurm.sbatch", *overrides], env, cwd=cwd, timeout=60)
        check_ok(proc)
        self.id = proc.stdout.strip().split(";")[0]
        self.run_dir = cwd / "outputs" / "slurm" / self.id

    def info(self) -> dict:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def output(self) -> str:
        f = self.cwd / f"slurm-dpcnn-{self.id}.out"
        return f.read_text() if f.exists() else ""

    def wait_for(self, what, timeout: float = 240):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if what():
                return time.monotonic() - t0
            time.sleep(0.3)
        subprocess.run(["scancel", self.id])
        pytest.fail(f"job {self.id}: timed out after {timeout} s\n{self.info()}\n{self.output()[-4000:]}")

    def active(self) -> bool:
        """Pending, running or still completing (the batch shell and its ranks not yet gone)."""
        out = subprocess.run(["squeue", "-h", "-j", self.id, "-o", "%T"], capture_output=True, text=True).stdout
        return bool(out.strip())

    def finished(self, timeout: float = 240) -> dict:
        self.wait_for(lambda: self.info().get("JobState") in FINAL and not self.active(), timeout)
        return self.info()

    def log_has(self, text: str) -> bool:
        log = self.run_dir / "train.log"
        return log.exists() and text in log.read_text()


@pytest.mark.slurm
@slurm
@pytest.mark.parametrize("launch", ["mpirun", "srun"])
def test_slurm_job_runs_to_completion(tmp_path, launch):
    needs_data()
    job = Job(tmp_path, *TINY, launch=launch)
    info = job.finished()
    assert info["JobState"] == "COMPLETED", job.output()
    assert info["Restarts"] == "0" and info["NumTasks"] == "2"
    assert_trained(job.run_dir)
    assert f"job {job.id} start 1" in job.output() and "training exited with 0" in job.output()


@pytest.mark.slurm
@slurm
@pytest.mark.parametrize("launch,scope", [("mpirun", "--batch"), ("srun", "--batch"),
                                          ("mpirun", "--full"), ("srun", "--full")])
def test_slurm_sigterm_checkpoints_requeues_and_resumes(tmp_path, launch, scope):
    """SIGTERM to the batch shell (--batch: what --signal=B:TERM@60 sends before the time limit) or to
    every process of the job at once (--full): the job checkpoints, requeues itself and resumes."""
    from mlflow.tracking import MlflowClient

    needs_data()
    steps, per_epoch = 1000, 79  # ~13 epochs of mnist-5k at batch 64: long enough to be cut mid-run
    job = Job(tmp_path, "model=tiny", "trainer=debug", f"trainer.max_steps={steps}", "trainer.epochs=100",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=slurm",
              *[f"++tracking.{k}=false" for k in ("plots", "log_model", "datasets")], launch=launch)
    job.wait_for(lambda: job.log_has("epoch 2:"))
    subprocess.run(["scancel", scope, "--signal=TERM", job.id], check=True)
    job.wait_for(lambda: job.info().get("Restarts") == "1")
    info = job.finished()
    out = job.output()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert f"requeueing job {job.id} (restart 1)" in out and f"job {job.id} start 2" in out

    resumed = re.search(rf"resuming from \S+/{job.id}/checkpoints/last.npz at step (\d+)\b", out)
    assert resumed, out
    cut = int(resumed.group(1))
    killed = (launch, scope) == ("srun", "--full")
    if killed:
        # srun answers its own SIGTERM by killing the ranks: the restart resumes from the last
        # epoch's checkpoint, after removing the killed ranks' shared memory (or MPI_Init hangs).
        assert "training exited with 137" in out and cut % per_epoch == 0 and cut >= per_epoch, out
    else:
        assert f"stopped by signal at step {cut}; checkpoint written" in out and "training exited with 143" in out
        assert per_epoch < cut < steps
    assert_trained(job.run_dir, steps)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id], order_by=["start_time"])
    assert len(runs) == 2
    first, second = runs
    assert second.info.status == "FINISHED"
    assert second.data.tags["dpcnn.resumed_at_step"] == str(cut)
    assert second.data.tags["dpcnn.resumed_from"] == first.info.run_id
    assert first.data.tags["dpcnn.resumed_by"] == second.info.run_id
    # KILLED when the ranks stopped themselves; left RUNNING by killed ranks, then marked FAILED by the resume
    assert first.info.status == ("FAILED" if killed else "KILLED")


def has_partition(name: str) -> bool:
    out = subprocess.run(["sinfo", "-h", "-p", name, "-o", "%P"], capture_output=True, text=True).stdout
    return bool(out.strip())


@pytest.mark.slurm
@slurm
@pytest.mark.parametrize("launch", ["mpirun", "srun"])
def test_slurm_preempted_job_requeues_itself_and_resumes(tmp_path, launch):
    """A job in `urgent` pre-empts ours (PreemptMode=CANCEL, as launch/slurm-localhost.sh sets up):
    Slurm sends SIGTERM to the job's tasks; the ranks checkpoint and the script requeues the job."""
    needs_data()
    if not has_partition("urgent"):
        pytest.skip("needs a partition `urgent` that pre-empts the default one (launch/slurm-localhost.sh)")
    steps = 4000  # pre-emption takes a scheduler pass or two: leave it something to cut
    job = Job(tmp_path, "model=tiny", "trainer=debug", f"trainer.max_steps={steps}", "trainer.epochs=100",
              "tracking=none", launch=launch)
    job.wait_for(lambda: job.log_has("epoch 2:"))
    urgent = run_script(["sbatch", "--parsable", "-p", "urgent", "--ntasks=2", "--time=2",
                         "--output=urgent-%j.out", "--wrap", "echo urgent ran on $SLURM_JOB_NODELIST"],
                        train_env(), cwd=tmp_path, timeout=60)
    check_ok(urgent)
    info = job.finished()
    out = job.output()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint written", out)
    assert stopped and "training exited with 143" in out, out
    assert re.search(rf"resuming from \S+ at step {stopped.group(1)}\b", out), out
    assert_trained(job.run_dir, steps)
    (log,) = tmp_path.glob("urgent-*.out")
    assert "urgent ran" in log.read_text()


@pytest.mark.slurm
@slurm
def test_slurm_scancel_checkpoints_and_stays_cancelled(tmp_path):
    """A user's plain scancel also stops at a step boundary with a checkpoint, but is not requeued."""
    needs_data()
    job = Job(tmp_path, "model=tiny", "trainer=debug", "trainer.max_steps=5000", "trainer.epochs=100",
              "tracking=none")
    job.wait_for(lambda: job.log_has("epoch 2:"))
    subprocess.run(["scancel", job.id], check=True)
    info = job.finished()
    out = job.output()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    assert "stopped by signal at step" in out and "not requeueing" in out
    cut = checkpoint.load(job.run_dir / "checkpoints" / checkpoint.LAST).step
    assert 2 * 79 <= cut < 5000
    time.sleep(3)
    assert job.info()["JobState"] == "CANCELLED"  # and it stays so
