"""Pruning sweeps: rank 0's Optuna pruner stops a hopeless trial at an epoch boundary, every rank; the sweep goes on."""

from __future__ import annotations

import csv
import math

import pytest
import yaml

from dpcnn import checkpoint

from conftest import check_ok, needs_data, run_train, train_env
from test_sweep import LEAN, audit, empty_mlflow_db, same_on_every_rank, sweep_dir, sweep_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.mpi

# Two sound learning rates, then a hopeless one (1e-6): after its first of 3 epochs it is far below the median.
BASE = ["model=tiny", "data.train_subset=1500", "data.val_fraction=0.1", "trainer.epochs=3", "trainer.progress=false"]
TRIALS = [*BASE, "optimizer.lr=tag(log,interval(0.000001,0.5))", "hydra.sweeper.mode=optuna",
          "hydra.sweeper.n_trials=3",
          "hydra.sweeper.enqueue=[{optimizer.lr:0.1},{optimizer.lr:0.05},{optimizer.lr:0.000001}]", *LEAN]
MEDIAN = "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:2,n_warmup_steps:0}"


def test_median_pruner_prunes_a_hopeless_trial_before_its_last_epoch(sweep_dir):  # noqa: F811 - the fixture
    needs_data()
    proc = run_train(2, "-m", *TRIALS, MEDIAN, "tracking.experiment=p", cwd=sweep_dir,
                     env=train_env(DPCNN_SWEEP_AUDIT=1, DPCNN_RUN_STAMP="p1"))
    check_ok(proc)
    trials = same_on_every_rank(audit(proc))  # every rank learnt it at the same epoch and returned the same
    assert math.isfinite(float(trials[0][1])) and math.isfinite(float(trials[1][1])) and trials[2][1] == "nan"
    out = sweep_dir / "multirun" / "p1"
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert [t["state"] for t in results["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert checkpoint.load(out / "2" / "checkpoints").meta["epoch"] == 1  # stopped after epoch 1 of 3
    assert checkpoint.load(out / "1" / "checkpoints").meta["epoch"] == 3
    with open(out / "trials.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["FINISHED", "FINISHED", "PRUNED"]
    _, (parent,), children = sweep_runs(sweep_dir, "p")
    child = {int(r.data.tags["dpcnn.sweep.trial"]): r for r in children}
    assert child[2].info.status == "KILLED" and child[2].data.tags["dpcnn.sweep.pruned"] == "1"
    assert child[2].data.tags["dpcnn.stop_reason"] == "pruned by the sweep's pruner at epoch 1"
    assert child[0].info.status == child[1].info.status == "FINISHED"
    assert parent.data.tags["dpcnn.sweep.pruned"] == "1" and parent.data.tags["dpcnn.sweep.failed"] == "0"
    assert parent.info.status == "FINISHED" and "1 pruned" in proc.stdout


def test_a_grid_sweep_prunes_too(workdir):
    needs_data()
    proc = run_train(2, "-m", *BASE, "optimizer.lr=0.1,0.05,0.000001", MEDIAN, "tracking=none", cwd=workdir,
                     env=train_env(DPCNN_SWEEP_AUDIT=1, DPCNN_RUN_STAMP="g1"))
    check_ok(proc)
    trials = same_on_every_rank(audit(proc))
    assert trials[2][1] == "nan" and math.isfinite(float(trials[1][1]))
    assert checkpoint.load(workdir / "multirun" / "g1" / "2" / "checkpoints").meta["epoch"] == 1


def test_an_unknown_pruner_stops_the_sweep_with_one_line(workdir):
    proc = run_train(2, "-m", *BASE, "optimizer.lr=0.1,0.05", "hydra.sweeper.pruner=mediam", "tracking=none",
                     cwd=workdir, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("hydra.sweeper.pruner must be one of none, median") == 2
    assert "Traceback" not in proc.stderr
