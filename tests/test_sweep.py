"""Sweeps under mpirun: grid and Optuna trials in lockstep on every rank, one MLflow parent per sweep."""

import csv
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint

from conftest import MPIRUN, REPO, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
# Lean trials: per-trial plots and model logging are not what these tests are about.
LEAN = ["++tracking.plots=false", "++tracking.log_model=false", "++tracking.datasets=false"]
AUDIT = re.compile(r"^dpcnn-sweep-audit trial=(\d+) rank=(\d+) config=(\w+) objective=(\S+)$", re.M)


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory):
    """Creating MLflow's SQLite schema takes seconds; do it once and copy it into each test's directory."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sweep_dir(workdir, empty_mlflow_db):
    shutil.copy(empty_mlflow_db, workdir / "mlflow.db")
    return workdir


def audit(proc) -> dict[int, dict[int, tuple[str, str]]]:
    """{trial: {rank: (config hash, objective)}} from the lines every rank prints with DPCNN_SWEEP_AUDIT=1."""
    out: dict = {}
    for trial, rank, config, objective in AUDIT.findall(proc.stdout):
        out.setdefault(int(trial), {})[int(rank)] = (config, objective)
    return out


def same_on_every_rank(trials: dict, ranks: int = 2) -> dict[int, tuple[str, str]]:
    for trial, by_rank in trials.items():
        assert sorted(by_rank) == list(range(ranks)), (trial, by_rank)
        assert len(set(by_rank.values())) == 1, f"trial {trial}: ranks differ: {by_rank}"
    return {t: by_rank[0] for t, by_rank in trials.items()}


def sweep_runs(workdir, experiment):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dpcnn.sweep.role") == "parent"]
    children = [r for r in runs if r not in parents]
    return client, parents, children


def test_grid_via_sweep_sh_one_parent_three_children_same_on_every_rank(sweep_dir):
    needs_data()
    lrs = ["0.01", "0.05", "0.2"]
    args = ["model=tiny", "trainer=debug", "data.val_fraction=0.1", "tracking.experiment=g", *LEAN,
            f"optimizer.lr={','.join(lrs)}"]

    def sweep(stamp):
        return subprocess.run(["bash", str(REPO / "launch" / "sweep.sh"), "-n", "2", *args], cwd=sweep_dir,
                              env=train_env(PYTHON=sys.executable, DPCNN_SWEEP_AUDIT=1, DPCNN_RUN_STAMP=stamp),
                              capture_output=True, text=True, timeout=300)

    proc = sweep("s1")
    check_ok(proc)
    objectives = same_on_every_rank(audit(proc))
    assert sorted(objectives) == [0, 1, 2]

    client, parents, children = sweep_runs(sweep_dir, "g")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.optimizer.lr"] == ",".join(lrs)
    assert parent.data.params["sweeper"] == "dpcnn grid" and parent.data.params["sweep.objective"] == "val_acc"
    assert len(children) == 3
    by_trial = {}
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        (lr,) = [o.split("=", 1)[1] for o in tags["dpcnn.sweep.overrides"].split() if o.startswith("optimizer.lr=")]
        assert params["optimizer.lr"] == lr and params["model.name"] == "tiny" and params["data.val_fraction"] == "0.1"
        trial = int(tags["dpcnn.sweep.trial"])
        # What every rank returned to the sweeper is the child's validation accuracy.
        assert objectives[trial] == (tags["dpcnn.sweep.trial_key"], tags["dpcnn.sweep.objective"])
        assert float(tags["dpcnn.sweep.objective"]) == run.data.metrics["val_acc"]
        by_trial[trial] = run
    assert [by_trial[t].data.params["optimizer.lr"] for t in range(3)] == lrs
    best = max(children, key=lambda r: r.data.metrics["val_acc"])
    assert parent.data.tags["dpcnn.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_acc"] == best.data.metrics["val_acc"]
    assert {"sweep_summary.png", "best_config.yaml", "best_command.txt", "trials.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    out = sweep_dir / "multirun" / "s1"
    assert (out / "sweep_summary.png").stat().st_size > 10_000
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["optimizer.lr"] for r in rows] == lrs and {r["status"] for r in rows} == {"FINISHED"}
    best_cfg = yaml.safe_load((out / "best_config.yaml").read_text())
    assert str(best_cfg["optimizer"]["lr"]) == best.data.params["optimizer.lr"]

    # The end of the output is the best trial as a command; it trains exactly that trial again.
    command = (out / "best_command.txt").read_text().strip()
    assert command in proc.stdout.splitlines()[-2]
    assert command.startswith("mpirun -n 2 python -m dpcnn.train ")
    assert f"optimizer.lr={best.data.params['optimizer.lr']}" in command.split()
    rerun = run_train(2, *shlex.split(command)[6:], "tracking.experiment=best", f"hydra.run.dir={sweep_dir / 'best'}",
                      cwd=sweep_dir)
    check_ok(rerun)
    history = checkpoint.load(sweep_dir / "best" / "checkpoints" / "last.npz").meta["history"]
    assert history[-1]["val_acc"] == best.data.metrics["val_acc"]
    _, parents, (alone,) = sweep_runs(sweep_dir, "best")
    assert not parents and "mlflow.parentRunId" not in alone.data.tags  # outside a sweep: not nested

    # The same sweep again resumes it: nothing is trained twice, no child is duplicated.
    again = sweep("s2")
    check_ok(again)
    assert same_on_every_rank(audit(again)) == objectives
    _, parents, children = sweep_runs(sweep_dir, "g")
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].data.tags["dpcnn.sweep.resumed"] == "1" and parents[0].info.status == "FINISHED"
    rows = list(csv.DictReader((sweep_dir / "multirun" / "s2" / "trials.csv").open()))
    assert [r["reused"] for r in rows] == ["True"] * 3
    assert "epoch 1:" not in again.stdout


def test_optuna_seeded_same_trials_on_every_rank_and_rerun_with_a_failing_trial(sweep_dir):
    needs_data()
    # hparams_search=smoke: tiny model, 20 steps, 3 TPE trials (seed 0); the first trial is forced to diverge.
    args = ["-m", "hparams_search=smoke", "hydra.sweeper.enqueue=[{optimizer.lr:1e6}]", "tracking.experiment=o",
            *LEAN]
    env = train_env(DPCNN_SWEEP_AUDIT=1, DPCNN_RUN_STAMP="o1")
    proc = run_train(2, *args, cwd=sweep_dir, env=env)
    check_ok(proc)
    trials = same_on_every_rank(audit(proc))
    assert sorted(trials) == [0, 1, 2]
    assert trials[0][1] == "nan" and all(math.isfinite(float(trials[t][1])) for t in (1, 2))

    results = yaml.safe_load((sweep_dir / "multirun" / "o1" / "optimization_results.yaml").read_text())
    assert [t["state"] for t in results["trials"]] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert results["trials"][0]["params"]["optimizer.lr"] == 1e6
    assert [repr(t["value"]) for t in results["trials"][1:]] == [trials[1][1], trials[2][1]]

    _, parents, children = sweep_runs(sweep_dir, "o")
    (parent,) = parents
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert parent.data.params["search.optimizer.lr"] == "tag(log, interval(0.01, 0.5))"
    assert "TPESampler, seed 0" in parent.data.params["sweeper"]
    status = {int(r.data.tags["dpcnn.sweep.trial"]): r for r in children}
    assert status[0].info.status == "FAILED" and status[0].data.params["optimizer.lr"] == "1000000.0"
    assert "diverged" in status[0].data.tags["dpcnn.sweep.error"]
    assert status[1].info.status == status[2].info.status == "FINISHED"
    assert parent.data.tags["dpcnn.sweep.failed"] == "1"

    # Rerun: the seeded sampler proposes the same trials (so every one is found already done), on every rank.
    again = run_train(2, *args, cwd=sweep_dir, env=train_env(DPCNN_SWEEP_AUDIT=1, DPCNN_RUN_STAMP="o2"))
    check_ok(again)
    assert same_on_every_rank(audit(again)) == trials
    results2 = yaml.safe_load((sweep_dir / "multirun" / "o2" / "optimization_results.yaml").read_text())
    assert results2["trials"] == results["trials"]
    _, parents, children = sweep_runs(sweep_dir, "o")
    assert len(parents) == 1 and len(children) == 3


def test_config_error_trial_is_failed_and_the_sweep_goes_on(sweep_dir):
    needs_data()
    # A global batch of 1 cannot be split over 2 ranks: the trial stops before training (and before its run).
    proc = run_train(2, "-m", "model=tiny", "trainer=debug", "tracking.experiment=c", *LEAN,
                     "trainer.batch_size=1,64", cwd=sweep_dir)
    check_ok(proc)
    _, (parent,), children = sweep_runs(sweep_dir, "c")
    status = {r.data.tags["dpcnn.sweep.trial"]: r for r in children}
    assert status["0"].info.status == "FAILED"
    assert status["0"].data.tags["dpcnn.sweep.error"].startswith("ConfigError: trainer.batch_size=1")
    assert status["0"].data.params["trainer.batch_size"] == "1"  # the failed trial's config is on record
    assert status["1"].info.status == "FINISHED"
    assert parent.data.tags["dpcnn.sweep.best_trial"] == "1" and parent.data.params["sweep.objective"] == "test_acc"


def test_ranks_with_different_configs_stop_the_sweep_on_every_rank(workdir):
    """Rank 1 reads a different conf/ (as another node with another checkout would): a clear error, no hang."""
    needs_data()
    other = workdir / "conf"
    shutil.copytree(REPO / "conf", other)
    tiny = other / "model" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("filters: 4", "filters: 5"))
    common = ["-m", "model=tiny", "trainer=debug", "tracking=none", "optimizer.lr=0.1,0.2"]
    py = [sys.executable, "-m", "dpcnn.train"]
    cmd = [str(MPIRUN), "-n", "1", *py, *common, ":", "-n", "1", *py, f"--config-path={other}", *common]
    proc = subprocess.run(cmd, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("trial 0: the ranks composed different configs") == 2, proc.stderr[-3000:]
    assert "epoch 1:" not in proc.stdout


def test_a_sweep_never_compares_validation_with_test_accuracy(sweep_dir):
    """The objective rule is one function (dpcnn.config.objective_name) for the trial and for the sweep:
    sweeping data.val_fraction over 0 and 0.1 would have ranked test accuracies against validation
    accuracies under one label; it is now a one-line error on every rank before any trial trains."""
    needs_data()
    proc = run_train(2, "-m", "model=tiny", "trainer=debug", "tracking.experiment=mix", *LEAN,
                     "data.val_fraction=0.1,0", cwd=sweep_dir, timeout=180)
    assert proc.returncode != 0
    line = "trial 0 would return val_acc but the sweep compares test_acc"
    assert proc.stderr.count(line) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "epoch 1:" not in proc.stdout + proc.stderr


def test_sweep_sh_slurm_mode_submits_itself_with_sbatch(tmp_path):
    log = tmp_path / "sbatch.args"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\necho "DPCNN_REPO=$DPCNN_REPO" >> {log}\n'
                    'echo "Submitted batch job 42"\n')
    fake.chmod(0o755)
    env = train_env(PYTHON=sys.executable, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "launch" / "sweep.sh"), "-n", "4", "--slurm", "--time=01:00:00",
                           "--", "hparams_search=optuna", "optimizer.momentum=0.8,0.9"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    check_ok(proc)
    assert "Submitted batch job 42" in proc.stdout
    args = log.read_text().splitlines()
    assert args == ["--job-name=dpcnn-sweep", "--output=slurm-%x-%j.out", "--ntasks=4", "--time=01:00:00",
                    str(REPO / "launch" / "sweep.sh"), "--in-slurm", "hparams_search=optuna",
                    "optimizer.momentum=0.8,0.9", f"DPCNN_REPO={REPO}"]


def test_search_configs_compose_and_map_to_optuna():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from dpcnn.sweep.sweeper import _distribution, search_space

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name, mode in [("optuna", "optuna"), ("grid", "grid"), ("smoke", "optuna")]:
            cfg = compose("config", overrides=[f"hparams_search={name}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.mode == mode and cfg.hydra.sweeper._target_.startswith("hydra_plugins.")
            assert cfg.data.val_fraction == 0.1  # the objective is validation accuracy, not test
            assert search_space(cfg)
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
        assert set(search_space(cfg)) == {"optimizer.lr", "optimizer.momentum", "optimizer.weight_decay",
                                          "trainer.batch_size", "model.layers.0.filters", "model.layers.3.filters"}
    parse = OverridesParser.create().parse_override
    assert _distribution(parse("a=tag(log, interval(0.001, 0.3))")) == FloatDistribution(0.001, 0.3, log=True)
    assert _distribution(parse("a=int(interval(2, 9))")) == IntDistribution(2, 9)
    assert _distribution(parse("a=tag(log, int(interval(8, 128)))")) == IntDistribution(8, 128, log=True)
    assert _distribution(parse("a=choice(8, 16)")) == CategoricalDistribution([8, 16])
    assert _distribution(parse("model=small,lenet5")) == CategoricalDistribution(["small", "lenet5"])
