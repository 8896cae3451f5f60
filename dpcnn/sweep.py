"""Hyperparameter sweeps under MPI: every rank runs the same trials, in lockstep.

``mpirun -n 2 python -m dpcnn.train -m optimizer.lr=0.01,0.1`` (a grid) and
``mpirun -n 2 python -m dpcnn.train -m hparams_search=optuna`` start one Hydra
multirun per rank. Each trial is a data-parallel training job, so all ranks
must run the same job sequence with the same configs. Three pieces:

- `MpiSweeper` (``hydra/sweeper=dpcnn``; Hydra loads sweepers only from the
  ``hydra_plugins`` package, so ``hydra_plugins/dpcnn_sweeper.py`` exposes it).
  Rank 0 alone expands the grid or asks Optuna for the next trial and
  broadcasts the trial's overrides; every rank then launches that one job.
  The Optuna study (sampler, storage) lives on rank 0 only; it is told the
  trial's objective, which every rank returns identically.
- `begin_trial` / `end_trial`, called by the task function on every rank: the
  trial's composed config must hash the same on every rank and the objective
  (allreduced by training) must be bitwise the same everywhere; if not,
  `SweepError` ends the sweep on all ranks with one clear line. A trial that
  fails (diverges, a config that cannot build) returns NaN: it is FAILED in
  MLflow and in Optuna, and the sweep goes on.
- `SweepCallback` (``hydra.callbacks.sweep``; rank 0 only, no collectives, so
  a tracking outage cannot desynchronise the ranks): one MLflow parent run per
  sweep; every trial is a nested child (the tracker reads
  ``DPCNN_MLFLOW_PARENT_RUN_ID`` and ``DPCNN_MLFLOW_TAGS``); a trial that
  fails before its run starts gets a FAILED child of its own. At the end the
  parent gets the best trial (tags, metric, ``best_config.yaml``), every
  trial (``trials.csv``) and ``sweep_summary.png`` (objective vs each swept
  parameter, and the optimisation history); the same files and
  ``best_command.txt`` (a ready-to-run command) land in the sweep directory.

Re-runs never duplicate children silently. A sweep is identified by a key
hashed from its command-line overrides, its sweeper settings (except
``n_trials``) and its composed base config; a trial by the hash of its
composed config. Running the same sweep again (e.g. after it was killed, or
with a larger ``n_trials``) resumes it: the earlier parent run is reused and a
trial whose config already FINISHED or FAILED there is not trained again
(training is deterministic): its recorded objective is returned, so a seeded
Optuna sampler proposes the same next trials. Trials left RUNNING or KILLED are
trained again, the new child tagged ``dpcnn.sweep.retry_of``. With
``hydra.callbacks.sweep.resume=false`` a new parent is started and everything
is trained again; a child whose config already ran in an earlier run of the
same sweep is tagged ``dpcnn.sweep.duplicate_of``.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.experimental.callback import Callback
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from .errors import DpcnnError

log = logging.getLogger("dpcnn.sweep")

#: Read by `dpcnn.tracking.MlflowTracker.start` (rank 0): nest the run under this parent, add these tags.
ENV_PARENT = "DPCNN_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "DPCNN_MLFLOW_TAGS"
#: DPCNN_SWEEP_AUDIT=1: every rank prints what each trial returned to the sweeper (for tests and doubts).
ENV_AUDIT = "DPCNN_SWEEP_AUDIT"

TERMINAL_OK = ("FINISHED", "FAILED")  # outcomes a resumed sweep does not train again


class SweepError(DpcnnError):
    """The ranks of a sweep disagree (or the sweep cannot start): ends the sweep, on every rank."""


def digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def config_digest(cfg: DictConfig) -> str:
    """Hash of a trial's composed config, without ``hydra`` and unresolved (so ``${oc.env:..}`` stays a formula)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return digest(container)


def objective_name(cfg: DictConfig) -> str:
    """What a trial returns: validation accuracy when there is a validation split, else test accuracy."""
    return "val_acc" if (OmegaConf.select(cfg, "data.val_fraction", default=0) or 0) > 0 else "test_acc"


# ------------------------------------------------------------ per trial, on every rank

#: Rank-local notes between the callback (rank 0), the task function and the sweeper.
_trial: dict = {}


def begin_trial(cfg: DictConfig, dist) -> float | None:
    """Check that every rank composed the same trial; returns a recorded objective if it need not be trained.

    Collective: every rank calls it first thing in a multirun job.
    """
    from hydra.core.hydra_config import HydraConfig

    num = HydraConfig.get().job.num
    mine = config_digest(cfg)
    digests = dist.allgather(mine)
    if len(set(digests)) != 1:
        raise SweepError(f"trial {num}: the ranks composed different configs (config hash by rank: "
                         f"{', '.join(digests)}); every rank must run the same checkout of dpcnn with the same "
                         "conf/ files, command line and environment")
    skip = _trial.pop("skip", None) if dist.is_root else None
    _trial.update(num=num, digest=mine, error=None)
    skip = dist.bcast(skip)
    if skip is None:
        return None
    value, run_id = skip
    log.info("trial %d: this config already ran in this sweep (MLflow run %s, objective %r); not trained again",
             num, run_id, value)
    return float(value)


def note_failure(error: BaseException) -> None:
    """The trial failed with a reported error (it returns NaN); remembered for its FAILED record."""
    _trial["error"] = f"{type(error).__name__}: {error}"


def end_trial(objective: float, dist) -> float:
    """The value handed back to the sweeper; verified bitwise identical on every rank. Collective."""
    objective = float(objective)
    values = dist.allgather(repr(objective))
    if len(set(values)) != 1:
        raise SweepError(f"trial {_trial.get('num')}: the ranks computed different objectives ({', '.join(values)}); "
                         "the metric must come from the allreduce")
    if os.environ.get(ENV_AUDIT):
        # One write per line, so lines from different ranks do not interleave in mpirun's output.
        sys.stdout.write(f"dpcnn-sweep-audit trial={_trial.get('num')} rank={dist.rank} "
                         f"config={_trial.get('digest')} objective={objective!r}\n")
        sys.stdout.flush()
    return objective


# ----------------------------------------------------------------------------- the sweeper

@dataclass
class MpiSweeperConf:
    _target_: str = "hydra_plugins.dpcnn_sweeper.DpcnnSweeper"
    _recursive_: bool = False     # the sampler is built on rank 0 only, and only in optuna mode
    mode: str = "grid"            # grid: the cartesian product of the swept values | optuna
    #: The search space in Hydra's override syntax, added to the command line's sweeps:
    #: `a,b,c` / choice(...) / range(...) (both modes); interval(lo,hi), tag(log, interval(lo,hi)) and, for
    #: integers, int(interval(lo,hi)) (optuna; a plain interval is always a float range).
    params: Optional[Dict[str, str]] = None
    direction: str = "maximize"   # the objective is an accuracy
    n_trials: int = 20            # optuna: trials to run in this invocation
    sampler: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    storage: Optional[str] = None     # optuna: null = in memory on rank 0 (re-runs resume through MLflow)
    study_name: Optional[str] = None
    enqueue: List[Any] = field(default_factory=list)  # optuna: trials to try first, e.g. [{optimizer.lr: 0.05}]


ConfigStore.instance().store(group="hydra/sweeper", name="dpcnn", node=MpiSweeperConf, provider="dpcnn")


def _key(override: Override) -> str:
    return override.get_key_element().lstrip("+~")


def _spec(override: Override) -> str:
    line = override.input_line or ""
    return line.split("=", 1)[1] if "=" in line else str(override.value())


def _distribution(override: Override):
    """An Optuna distribution for one sweep override (Hydra's syntax)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if override.is_interval_sweep():
        sweep = override.value()
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if override.is_discrete_sweep():  # choice, a,b,c or range: the listed values
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    raise SweepError(f"{override.input_line}: not a sweep Optuna can sample")


class MpiSweeper(Sweeper):
    """Grid or Optuna trials, decided on rank 0 and run by every rank in lockstep (see the module doc)."""

    def __init__(self, mode: str = "grid", params: Optional[dict] = None, direction: str = "maximize",
                 n_trials: int = 20, sampler: Optional[dict] = None, storage: Optional[str] = None,
                 study_name: Optional[str] = None, enqueue: Optional[list] = None) -> None:
        super().__init__()
        self.mode, self.direction, self.n_trials = str(mode), str(direction), int(n_trials)
        self.params = dict(params or {})
        self.sampler, self.storage, self.study_name = sampler, storage, study_name
        self.enqueue = list(enqueue or [])
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from .dist import Dist

        dist = Dist()
        try:
            if self.mode not in ("grid", "optuna"):
                raise SweepError(f"hydra.sweeper.mode must be grid or optuna, got {self.mode!r}")
            if self.direction not in ("maximize", "minimize"):
                raise SweepError(f"hydra.sweeper.direction must be maximize or minimize, got {self.direction!r}")
            args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
            if dist.is_root:
                sweep_dir = Path(str(self.config.hydra.sweep.dir))
                sweep_dir.mkdir(parents=True, exist_ok=True)
                OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            return self._grid(dist, args) if self.mode == "grid" else self._optuna(dist, args)
        except SweepError as e:  # raised on every rank at the same point
            print(f"dpcnn: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:  # noqa: BLE001 - on this rank only: the others would wait forever
            traceback.print_exc()
            print(f"dpcnn: the sweep failed on rank {dist.rank}; aborting all ranks", file=sys.stderr, flush=True)
            dist.abort(1)

    # --- grid ------------------------------------------------------------------------
    def _grid(self, dist, args: list[str]) -> list:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        def expand():
            overrides = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(args)
            for o in overrides:
                if o.is_sweep_override() and not o.is_discrete_sweep():
                    raise SweepError(f"{o.input_line}: a grid needs listed values (a,b,c / choice / range); "
                                     "interval(...) needs Optuna: hparams_search=optuna or hydra.sweeper.mode=optuna")
            return BasicSweeper.split_arguments(overrides, None)[0]

        jobs = dist.from_root(expand, Exception, SweepError)
        # A typo (unknown option or key) stops the sweep before any training, on every rank.
        dist.agree(lambda: self.validate_batch_is_legal(jobs), Exception, SweepError)
        return [self._launch(num, job) for num, job in enumerate(jobs)]

    def _launch(self, num: int, job: list[str]):
        (ret,) = self.launcher.launch([job], initial_job_idx=num)
        ret.return_value  # noqa: B018 - re-raises a SweepError from the job (all ranks raise it together)
        return ret

    # --- optuna ----------------------------------------------------------------------
    def _optuna(self, dist, args: list[str]) -> list:
        study = space = None
        fixed: list[str] = []

        def plan():
            nonlocal study, space, fixed
            import optuna
            from hydra.utils import instantiate

            parsed = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(args)
            space = {_key(o): _distribution(o) for o in parsed if o.is_sweep_override()}
            fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
            if not space:
                raise SweepError("nothing to search: give hydra.sweeper.params or sweeps such as "
                                 "'optimizer.lr=tag(log,interval(0.001,0.3))'")
            sampler = instantiate(self.sampler) if self.sampler else None
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                        direction=self.direction, load_if_exists=True)
            for params in self.enqueue:
                study.enqueue_trial(OmegaConf.to_container(params) if isinstance(params, DictConfig) else params,
                                    skip_if_exists=True)
            log.info("Optuna study %s (%s, %s), %d trial(s) to run; search space: %s", study.study_name,
                     type(study.sampler).__name__, self.direction, self.n_trials,
                     ", ".join(f"{k}: {d}" for k, d in space.items()))
            # One representative trial, to catch typos in the search space's keys before any training.
            return fixed + [f"{k}={_representative(d)}" for k, d in space.items()]

        probe = dist.from_root(plan, Exception, SweepError)
        dist.agree(lambda: self.validate_batch_is_legal([probe]), Exception, SweepError)
        results = []
        for num in range(self.n_trials):
            pending = None

            def ask():
                nonlocal pending
                pending = study.ask(space)
                return fixed + [f"{k}={v}" for k, v in pending.params.items()]

            job = dist.from_root(ask, Exception, SweepError)
            try:
                self.validate_batch_is_legal([job])
                error = None
            except Exception as e:  # noqa: BLE001 - e.g. a categorical choice naming a missing config
                error = f"{type(e).__name__}: {e}"
            errors = dist.allgather(error)
            if any(errors) and not all(errors):
                raise SweepError(f"trial {num} composes on some ranks only: {[e for e in errors if e][0]}")
            if error:
                log.warning("trial %d: %s does not compose (%s); FAILED, going on", num, " ".join(job), error)
                _record_unlaunched(num, job, error)
                value = float("nan")
            else:
                ret = self._launch(num, job)
                value = float(ret.return_value)
                results.append(ret)
            if dist.is_root:
                self._tell(study, pending, value)
        if dist.is_root:
            self._save_results(study)
        return [results]

    def _tell(self, study, trial, value: float) -> None:
        from optuna.trial import TrialState

        if math.isfinite(value):
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState.FAIL)

    def _save_results(self, study) -> None:
        from optuna.trial import TrialState

        trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                  for t in study.trials]
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        results = {"name": "optuna", "study_name": study.study_name, "direction": self.direction,
                   "sampler": type(study.sampler).__name__, "trials": trials}
        if done:
            results.update(best_params=study.best_trial.params, best_value=study.best_value)
        OmegaConf.save(OmegaConf.create(results), Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml")


def _representative(distribution) -> Any:
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices else distribution.low


def _record_unlaunched(num: int, job: list[str], error: str) -> None:
    """A trial that could not even be composed still gets its FAILED record (rank 0's callback)."""
    if SweepCallback.active is not None:
        SweepCallback.active.record_unlaunched(num, job, error)


# ----------------------------------------------------------------------------- MLflow parent run

@dataclass
class TrialRecord:
    number: int
    overrides: list
    values: dict            # swept key -> the value this trial used
    key: str                # config hash
    objective: float
    status: str             # FINISHED / FAILED / KILLED
    run_id: Optional[str]
    reused: bool = False    # not trained: this config's result was already recorded
    error: Optional[str] = None
    config_yaml: Optional[str] = None


def sweep_key(config: DictConfig) -> str:
    """What identifies "the same sweep" across invocations (n_trials excluded, so a sweep can be extended)."""
    container = OmegaConf.to_container(config, resolve=False)
    hydra = container.pop("hydra", {})
    sweeper = dict(hydra.get("sweeper") or {})
    sweeper.pop("n_trials", None)
    return digest({"overrides": sorted(hydra.get("overrides", {}).get("task", [])), "sweeper": sweeper,
                   "config": container})


def search_space(config: DictConfig) -> dict[str, str]:
    """{key: spec} of what a sweep varies: hydra.sweeper.params and the command line's sweeps."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    return {_key(o): _spec(o) for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}


def _trial_value(config: DictConfig, key: str):
    """The value a trial used for a swept key: the chosen option for a config group, else the config value."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    if key in choices:
        return choices[key]
    value = OmegaConf.select(config, key, default=None)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def command_for(overrides: list[str], world_size: int, multirun: bool = False) -> str:
    """The shell command that runs these overrides on this many ranks."""
    launcher = f"mpirun -n {world_size} python" if world_size > 1 else "python"
    return " ".join([launcher, "-m", "dpcnn.train", *(["-m"] if multirun else []),
                     *(shlex.quote(o) for o in overrides)])


class SweepCallback(Callback):
    """One MLflow parent run per sweep, trial bookkeeping and the sweep summary; acts on rank 0 only.

    ``resume`` (default true): a re-run of the same sweep continues its parent
    run and does not train again configs that already finished or failed there.
    """

    #: The callback of the sweep running in this process (rank 0), for the sweeper's FAILED records.
    active: "SweepCallback | None" = None

    def __init__(self, resume: bool = True, plot: bool = True) -> None:
        self.resume, self.plot = bool(resume), bool(plot)
        self.on = False

    # --- MLflow, never fatal ---------------------------------------------------------
    def _safe(self, what: str, fn, *args, **kwargs):
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must not stop the sweep
            log.warning("sweep: MLflow %s failed (%s: %s)", what, type(e).__name__, str(e).splitlines()[0][:200])
            return None

    # --- hooks -----------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from .dist import world_rank_and_size

        rank, self.world_size = world_rank_and_size()
        if rank != 0:
            return
        self.on, SweepCallback.active = True, self
        self.records: list[TrialRecord] = []
        self.current: dict | None = None
        self.previous: dict[str, dict] = {}   # config hash -> {run_id, status, objective}
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.key = sweep_key(config)
        self.space = search_space(config)
        self.objective = objective_name(config)
        sweeper = config.hydra.sweeper
        self.direction = str(sweeper.get("direction", "maximize"))
        self.mode = str(sweeper.get("mode", "grid"))
        if self.objective == "test_acc":
            log.warning("sweep: the objective is TEST accuracy (data.val_fraction=0): you are tuning on the test set; "
                        "use data.val_fraction=0.1 or hparams_search=grid|optuna, which do")
        self.client = self.parent = None
        tracking = config.get("tracking") or {}
        if tracking.get("backend", "mlflow") not in (None, "none"):
            try:
                self._start_parent(config, tracking)
            except Exception as e:  # noqa: BLE001
                log.warning("sweep: no MLflow parent run (%s: %s); trials are tracked as separate runs",
                            type(e).__name__, str(e).splitlines()[0][:200])
                self.client = self.parent = None
        atexit.register(self._cut_short)

    def _start_parent(self, config: DictConfig, tracking) -> None:
        from mlflow.tracking import MlflowClient

        from .tracking import default_uri

        self.client = MlflowClient(tracking_uri=tracking.get("uri") or default_uri())
        name = tracking.get("experiment", "dpcnn")
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        earlier = self.client.search_runs(
            [self.experiment_id], order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`dpcnn.sweep.key` = '{self.key}' and tags.`dpcnn.sweep.role` = 'parent'")
        for parent in reversed(earlier):  # oldest first, so the newest record of a config wins
            for run in self.client.search_runs([self.experiment_id], max_results=5000,
                                               filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
                status = run.info.status
                if self.resume and status == "RUNNING":  # its sweep was killed mid-trial: it will not finish
                    self.client.set_terminated(run.info.run_id, "KILLED")
                    status = "KILLED"
                self._remember(run.data.tags.get("dpcnn.sweep.trial_key"), run.info.run_id, status,
                               run.data.tags.get("dpcnn.sweep.objective"))
        sampler = OmegaConf.to_container(config.hydra.sweeper.get("sampler") or {}) if self.mode == "optuna" else None
        tags = {"dpcnn.sweep.role": "parent", "dpcnn.sweep.key": self.key, "dpcnn.sweep.dir": str(self.sweep_dir),
                "dpcnn.world_size": str(self.world_size),
                "dpcnn.sweep.command": command_for(list(config.hydra.overrides.task), self.world_size, multirun=True)}
        if self.mode == "optuna":
            tags["dpcnn.sweep.n_trials"] = str(config.hydra.sweeper.get("n_trials"))
        if self.resume and earlier:
            self.parent = earlier[0].info.run_id
            resumed = int(earlier[0].data.tags.get("dpcnn.sweep.resumed", "0")) + 1
            self.client.update_run(self.parent, status="RUNNING")
            self.client.set_tag(self.parent, "dpcnn.sweep.resumed", str(resumed))
            for k, v in tags.items():
                self.client.set_tag(self.parent, k, v)
            log.info("sweep: resuming sweep %s in MLflow run %s: %d recorded trial(s) are not trained again "
                     "(hydra.callbacks.sweep.resume=false trains everything anew)", self.key, self.parent,
                     sum(p["status"] in TERMINAL_OK for p in self.previous.values()))
        else:
            from mlflow.entities import Param

            run = self.client.create_run(self.experiment_id, run_name=f"sweep-{self.mode}-{self.key[:6]}", tags=tags)
            self.parent = run.info.run_id
            params = {"sweeper": "dpcnn " + self.mode + (f" ({sampler.get('_target_', '?').rsplit('.', 1)[-1]}, "
                                                         f"seed {sampler.get('seed')})" if sampler else ""),
                      "sweep.mode": self.mode, "sweep.direction": self.direction, "sweep.objective": self.objective,
                      **({"sweep.sampler": json.dumps(sampler, sort_keys=True)} if sampler else {}),
                      **{f"search.{k}": v for k, v in self.space.items()}}
            self.client.log_batch(self.parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        os.environ[ENV_PARENT] = self.parent

    def _remember(self, key, run_id, status, objective) -> None:
        if not key:
            return
        value = float(objective) if objective is not None else float("nan")
        old = self.previous.get(key)
        if old is None or status in TERMINAL_OK or old["status"] not in TERMINAL_OK:
            self.previous[key] = {"run_id": run_id, "status": status, "objective": value}

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if not self.on:
            return
        key, num = config_digest(config), int(config.hydra.job.num)
        overrides = list(config.hydra.overrides.task)
        prev = self.previous.get(key)
        self.current = {"num": num, "key": key, "overrides": overrides, "prev": prev, "reused": False,
                        "attempt": uuid.uuid4().hex}
        if self.resume and prev and prev["status"] in TERMINAL_OK:
            self.current["reused"] = True
            _trial["skip"] = (prev["objective"], prev["run_id"])  # begin_trial shares it with every rank
            return
        tags = {"dpcnn.sweep.key": self.key, "dpcnn.sweep.trial": str(num), "dpcnn.sweep.trial_key": key,
                "dpcnn.sweep.attempt": self.current["attempt"], "dpcnn.sweep.overrides": " ".join(overrides)[:5000]}
        if prev:
            tags["dpcnn.sweep.retry_of" if self.resume else "dpcnn.sweep.duplicate_of"] = prev["run_id"]
        os.environ[ENV_TAGS] = json.dumps(tags)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if not self.on or self.current is None:
            return
        os.environ.pop(ENV_TAGS, None)
        cur, self.current = self.current, None
        value = float("nan")
        if job_return.status == JobStatus.COMPLETED:
            try:
                value = float(job_return.return_value)
            except (TypeError, ValueError):
                pass
        error = _trial.pop("error", None)
        record = TrialRecord(cur["num"], cur["overrides"], {k: _trial_value(config, k) for k in self.space},
                             cur["key"], value, "FINISHED" if math.isfinite(value) else "FAILED", None,
                             reused=cur["reused"], error=error, config_yaml=_yaml(job_return.cfg))
        if cur["reused"]:
            record.run_id = cur["prev"]["run_id"]
            record.status = cur["prev"]["status"]
        else:
            runs = self._safe("search", self.client.search_runs, [self.experiment_id],
                              filter_string=f"tags.`dpcnn.sweep.attempt` = '{cur['attempt']}'") if self.client else None
            if runs:
                record.run_id, record.status = runs[0].info.run_id, runs[0].info.status
                if not math.isfinite(value) and record.status == "FINISHED":
                    record.status = "FAILED"  # finished but produced no usable objective
                    self._safe("status", self.client.set_terminated, record.run_id, "FAILED")
            else:
                record.run_id = self._failed_child(cur["num"], cur["key"], cur["overrides"], error, config,
                                                   cur["prev"], cur["attempt"])
            if record.run_id:
                tags = {"dpcnn.sweep.objective": repr(value)}
                if error:
                    tags["dpcnn.sweep.error"] = error[:5000]
                for k, v in tags.items():
                    self._safe("tag", self.client.set_tag, record.run_id, k, v)
            self._remember(cur["key"], record.run_id, record.status, repr(value))
        self._add(record)

    def record_unlaunched(self, num: int, job: list[str], error: str) -> None:
        """A trial whose config did not compose (called by the sweeper on rank 0)."""
        if not self.on:
            return
        key = digest(sorted(job))
        run_id = self._failed_child(num, key, job, error, None, None, uuid.uuid4().hex)
        self._add(TrialRecord(num, job, {}, key, float("nan"), "FAILED", run_id, error=error))

    def _failed_child(self, num, key, overrides, error, config, prev, attempt) -> str | None:
        """A FAILED child run for a trial that failed before its own run started."""
        if self.client is None:
            return None
        from mlflow.entities import Param

        from .tracking import flatten

        tags = {"mlflow.parentRunId": self.parent, "dpcnn.sweep.key": self.key, "dpcnn.sweep.trial": str(num),
                "dpcnn.sweep.trial_key": key, "dpcnn.sweep.attempt": attempt,
                "dpcnn.sweep.overrides": " ".join(overrides)[:5000], "dpcnn.sweep.error": (error or "?")[:5000]}
        if prev:
            tags["dpcnn.sweep.retry_of" if self.resume else "dpcnn.sweep.duplicate_of"] = prev["run_id"]
        run = self._safe("create_run", self.client.create_run, self.experiment_id,
                         run_name=f"trial-{num}-failed", tags=tags)
        if run is None:
            return None
        if config is not None:
            task = OmegaConf.to_container(config, resolve=False)
            task.pop("hydra", None)
            params = [Param(k, v[:6000]) for k, v in flatten(task).items()]
            for i in range(0, len(params), 100):
                self._safe("params", self.client.log_batch, run.info.run_id, params=params[i:i + 100])
        self._safe("status", self.client.set_terminated, run.info.run_id, "FAILED")
        return run.info.run_id

    def _add(self, record: TrialRecord) -> None:
        self.records.append(record)
        best = self._best()
        log.info("sweep: trial %d %s: %s %r%s", record.number, record.status, self.objective, record.objective,
                 f" (best so far: trial {best.number}, {best.objective:.4f})" if best else "")
        if self.client is not None and math.isfinite(record.objective):
            metrics = {"trial_objective": record.objective, f"best_{self.objective}": best.objective}
            for k, v in metrics.items():
                self._safe("metric", self.client.log_metric, self.parent, k, v, step=record.number)

    def _best(self) -> TrialRecord | None:
        ok = [r for r in self.records if math.isfinite(r.objective)]
        if not ok:
            return None
        return (max if self.direction == "maximize" else min)(ok, key=lambda r: r.objective)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.on:
            return
        self.on, SweepCallback.active = False, None
        atexit.unregister(self._cut_short)
        os.environ.pop(ENV_PARENT, None)
        best = self._best()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        files = [self._write_csv(self.sweep_dir / "trials.csv")]
        if self.plot and self.records:
            try:
                files.append(summary_plot(self.records, self.space, self.objective, self.direction,
                                          self.sweep_dir / "sweep_summary.png"))
            except Exception as e:  # noqa: BLE001 - a plot is not worth failing a sweep
                log.warning("sweep: summary plot failed (%s: %s)", type(e).__name__, e)
        n_failed = sum(r.status != "FINISHED" for r in self.records)
        tags = {"dpcnn.sweep.trials": str(len(self.records)), "dpcnn.sweep.failed": str(n_failed),
                "dpcnn.sweep.reused": str(sum(r.reused for r in self.records))}
        if best is not None:
            command = command_for(best.overrides, self.world_size)
            (self.sweep_dir / "best_command.txt").write_text(command + "\n")
            files.append(self.sweep_dir / "best_command.txt")
            if best.config_yaml:
                (self.sweep_dir / "best_config.yaml").write_text(best.config_yaml)
                files.append(self.sweep_dir / "best_config.yaml")
            tags.update({"dpcnn.sweep.best_trial": str(best.number), "dpcnn.sweep.best_run_id": best.run_id or "",
                         f"dpcnn.sweep.best_{self.objective}": repr(best.objective),
                         "dpcnn.sweep.best_overrides": " ".join(best.overrides)[:5000],
                         "dpcnn.sweep.best_command": command[:5000]})
            where = f" (MLflow run {best.run_id})" if best.run_id else ""
            print(f"dpcnn: sweep done: {len(self.records)} trial(s), {n_failed} failed; best is trial {best.number} "
                  f"with {self.objective} {best.objective:.4f}{where}. To train it:\n  {command}", flush=True)
        else:
            print(f"dpcnn: sweep done: all {len(self.records)} trial(s) failed", flush=True)
        if self.client is not None:
            for k, v in tags.items():
                self._safe("tag", self.client.set_tag, self.parent, k, v)
            if best is not None:
                self._safe("metric", self.client.log_metric, self.parent, f"best_{self.objective}", best.objective)
            for f in files:
                self._safe("artifact", self.client.log_artifact, self.parent, str(f))
            self._safe("end", self.client.set_terminated, self.parent, "FINISHED" if best is not None else "FAILED")

    def _cut_short(self) -> None:
        """At exit without on_multirun_end (an error or a signal ended the sweep): the parent is KILLED."""
        if self.on and self.client is not None:
            self._safe("end", self.client.set_terminated, self.parent, "KILLED")

    def _write_csv(self, path: Path) -> Path:
        keys = list(self.space)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["trial", "status", self.objective, "run_id", "reused", *keys, "overrides"])
            for r in self.records:
                w.writerow([r.number, r.status, repr(r.objective), r.run_id or "", r.reused,
                            *(r.values.get(k, "") for k in keys), " ".join(r.overrides)])
        return path


def _yaml(cfg) -> str | None:
    if cfg is None:
        return None
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that only resolves inside the job
        return OmegaConf.to_yaml(cfg)


# ----------------------------------------------------------------------------- the summary plot

def summary_plot(records: list[TrialRecord], space: dict[str, str], objective: str, direction: str,
                 path: Path) -> Path:
    """Objective vs each swept parameter (failed trials as red crosses at the bottom), and the history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = list(space)
    n = len(keys) + 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    ok = [r for r in records if math.isfinite(r.objective)]
    lo, hi = min((r.objective for r in ok), default=0.0), max((r.objective for r in ok), default=1.0)
    floor = lo - 0.08 * ((hi - lo) or 0.1)  # where failed trials are drawn: below every real value
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        vals = [r.values.get(key) for r in records]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None)
        if numeric:
            pos = {id(r): r.values.get(key) for r in records}
            positive = [v for v in vals if v is not None and v > 0]
            if "log" in space[key] or (len(positive) == len(vals) and positive and max(positive) / min(positive) >= 10):
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in vals}, key=str)
            pos = {id(r): labels.index(str(r.values.get(key))) for r in records}
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        good = [r for r in ok if pos[id(r)] is not None]
        ax.scatter([pos[id(r)] for r in good], [r.objective for r in good], color="C0", zorder=3)
        bad = [r for r in records if not math.isfinite(r.objective) and pos[id(r)] is not None]
        if bad:
            ax.scatter([pos[id(r)] for r in bad], [floor] * len(bad), marker="x", color="red", label="failed", zorder=3)
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(rows, cols, n)
    best, running = [], None
    pick = max if direction == "maximize" else min
    for r in sorted(ok, key=lambda r: r.number):
        running = r.objective if running is None else pick(running, r.objective)
        best.append((r.number, running))
    ax.scatter([r.number for r in ok], [r.objective for r in ok], color="C0", label="trial", zorder=3)
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="C1", label="best so far")
    bad = [r for r in records if not math.isfinite(r.objective)]
    if bad:
        ax.scatter([r.number for r in bad], [floor] * len(bad), marker="x", color="red", label="failed", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title("optimisation history")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path
