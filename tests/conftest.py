"""Shared test helpers: where the real datasets are, and how to launch training under mpirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPCNN_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST_5K = SHARED_DATA / "mnist-5k"
MPIRUN = Path(sys.executable).parent / "mpirun"


def needs_data():
    if not (MNIST_5K / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST subset not found at {MNIST_5K}; set DPCNN_SHARED_DATA to ../shared/data")


def train_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DPCNN_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               DPCNN_DATA_DIR=str(MNIST_5K), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(ranks: int, *overrides: str, cwd: Path, timeout: float = 300, env: dict | None = None,
              module: str = "dpcnn.train") -> subprocess.CompletedProcess:
    """``mpirun -n ranks python -m dpcnn.train overrides...`` (no mpirun when ranks == 0)."""
    cmd = [sys.executable, "-m", module, *overrides]
    if ranks:
        cmd = [str(MPIRUN), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env or train_env(), capture_output=True, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory to run in (its own mlflow.db and outputs/)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _mlflow_global_uri_restored():
    """A test that sets MLflow's global tracking URI (``runs:/`` loading reads it; MLflow also exports it as
    MLFLOW_TRACKING_URI) must not leak it into the tests after it, whatever order they run in."""
    name = "mlflow.tracking._tracking_service.utils"
    before = getattr(sys.modules[name], "_tracking_uri", None) if name in sys.modules else None
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if name in sys.modules and sys.modules[name]._tracking_uri != before:
        sys.modules[name].set_tracking_uri(before)
    if env_before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_before
