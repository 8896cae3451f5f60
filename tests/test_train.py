"""The training command end to end, under mpirun."""

import time

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint
from dpcnn.model import Model
from dpcnn.step import micro_slices

from conftest import REPO, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
QUIET = ["trainer.progress=false"]


def final_params(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.npz").params


@pytest.mark.parametrize("dtype,steps,extra,tol", [
    ("float64", 20, [], 1e-9),
    # float32 differs across world sizes only by the order of the gradient sums (~1e-7 after a
    # step), but over many steps such differences flip ReLU / max-pool near-ties and float32
    # trajectories separate chaotically (README, "World-size invariance"); so 2 steps here ...
    ("float32", 2, [], 1e-6),
    # ... and 20 with micro-batches of 5, which every shard of 60 over 1-4 ranks is made of.
    ("float32", 20, ["trainer.micro_batch=5"], 0.0),
])
def test_world_size_invariance(workdir, dtype, steps, extra, tol):
    """Same seed and global batch: 1, 2, 3 and 4 ranks end with the same weights."""
    needs_data()
    params = {}
    for n in (1, 2, 3, 4):
        run_dir = workdir / f"ws{n}"
        check_ok(run_train(n, "model=small", f"trainer.max_steps={steps}", "trainer.batch_size=60",
                           f"trainer.dtype={dtype}", *extra, "tracking=none", f"hydra.run.dir={run_dir}", *QUIET,
                           cwd=workdir))
        params[n] = final_params(run_dir)
        assert params[n].dtype == np.dtype(dtype)
    initial = Model.from_config(yaml.safe_load((REPO / "conf" / "model" / "small.yaml").read_text())["layers"],
                                seed=0, dtype=dtype).params
    assert np.max(np.abs(params[1] - initial)) > 1e-3  # it trained
    for n in (2, 3, 4):
        assert np.max(np.abs(params[n] - params[1])) <= tol, n


def test_micro_batches_sum_to_the_whole_batch_gradient(workdir):
    """Micro-batches of 7 (not dividing the shards of 32: the last ones are shorter) train like
    whole shards, to float64 rounding."""
    needs_data()
    params = {}
    for micro in ("null", "7"):
        run_dir = workdir / f"micro-{micro}"
        check_ok(run_train(2, "model=small", "trainer.max_steps=3", "trainer.dtype=float64",
                           f"trainer.micro_batch={micro}", "tracking=none", f"hydra.run.dir={run_dir}", *QUIET,
                           cwd=workdir))
        params[micro] = final_params(run_dir)
    assert np.max(np.abs(params["7"] - params["null"])) <= 1e-12


def test_micro_slices_cut_at_global_multiples():
    assert micro_slices(30, 30, 5) == [slice(i, i + 5) for i in range(0, 30, 5)]
    # shard [7, 17) of its batch, micro-batches of 5: cut at 10 and 15
    assert micro_slices(7, 10, 5) == [slice(0, 3), slice(3, 8), slice(8, 10)]
    assert micro_slices(0, 3, 8) == [slice(0, 3)]
    assert micro_slices(4, 0, 8) == []


def test_one_epoch_two_ranks_tracked_in_mlflow(workdir):
    needs_data()
    proc = run_train(2, "model=tiny", "trainer.epochs=1", "trainer.log_every=10", "tracking.experiment=t",
                     f"hydra.run.dir={workdir / 'run'}", *QUIET, cwd=workdir)
    check_ok(proc)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny" and run.data.params["world_size"] == "2"
    assert run.data.params["trainer.batch_size"] == "64"
    assert run.data.tags["dpcnn.world_size"] == "2" and "MPICH" in run.data.tags["dpcnn.mpi"]
    assert run.data.metrics["test_acc"] > 0.80  # one epoch of 5,000 images with a 2k-parameter model
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")]
    assert steps == list(range(10, 79, 10))  # 5,000 / 64 -> 79 steps
    assert {"img_per_s", "allreduce_frac", "train_loss", "test_loss"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in names
    cfg = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))))
    assert cfg["model"]["name"] == "tiny" and cfg["data"]["name"] == "mnist"
    ckpt = checkpoint.load(workdir / "run" / "checkpoints" / "last.npz")
    assert ckpt.meta["epoch"] == 1 and ckpt.meta["step"] == 79 and ckpt.meta["mlflow_run_id"] == run.info.run_id
    assert (workdir / "run" / ".hydra" / "config.yaml").is_file()


def test_overrides_compose(workdir):
    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(0, "model=lenet5", "optimizer=nesterov", "optimizer.lr=0.05", "trainer=debug",
                       "tracking=none", f"hydra.run.dir={run_dir}", cwd=workdir))
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert cfg["model"]["name"] == "lenet5" and cfg["optimizer"]["nesterov"] is True
    assert cfg["optimizer"]["momentum"] == 0.9 and cfg["optimizer"]["lr"] == 0.05
    assert checkpoint.load(run_dir / "checkpoints").meta["step"] == 20


def test_invalid_override_fails_on_every_rank_before_training(workdir):
    start = time.monotonic()
    proc = run_train(2, "model=tiny", "model.layers.0.kernel_size=30", "model.layers.0.padding=valid",
                     "tracking=none", *QUIET, cwd=workdir, timeout=60)
    assert proc.returncode != 0
    line = "kernel 30x30 is larger than its (padded) input 28x28"
    assert proc.stderr.count(line) == 2, proc.stderr  # one line per rank
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1"),
    ("trainer.batch_size=1", "trainer.batch_size=1 is the GLOBAL batch and is smaller than the 2 ranks"),
    ("trainer.epochs=0", "trainer.epochs must be >= 1, got 0"),
    ("trainer.micro_batch=0", "trainer.micro_batch must be >= 1 or null, got 0"),
    ("data.name=cifar", "unknown dataset 'cifar'"),
    ("model.layers.1.type=bogus", "unknown layer type 'bogus'"),
])
def test_bad_config_one_line_on_every_rank(workdir, override, message):
    proc = run_train(2, "model=tiny", override, "tracking=none", *QUIET, cwd=workdir, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count(message) == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_offline_fails_cleanly(workdir):
    proc = run_train(2, "model=tiny", "tracking=none", "data.download=false", *QUIET, cwd=workdir, timeout=60,
                     env=train_env(DPCNN_DATA_DIR=workdir / "nothing-here"))
    assert proc.returncode != 0
    assert proc.stderr.count("DPCNN_DATA_DIR") >= 2 and "train-images-idx3-ubyte.gz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rank_that_raises_ends_job_and_fails_run(workdir):
    needs_data()
    start = time.monotonic()
    proc = run_train(2, "model=tiny", "trainer.epochs=2", "tracking.experiment=f", *QUIET, cwd=workdir, timeout=90,
                     env=train_env(DPCNN_FAULT="rank=1,step=30"))
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "injected fault on rank 1 at step 30" in proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("f").experiment_id])
    assert run.info.status == "FAILED"
