"""`MpiSweeper`: grid or Optuna trials, decided on rank 0 and run by every rank in lockstep."""

from __future__ import annotations

import logging
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..dist import Dist
from ..errors import report
from .trial import TRIAL, SweepError

log = logging.getLogger("dpcnn.sweep")

PRUNERS = ("none", "median", "hyperband")


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
    #: Stop hopeless trials early (both modes): none | median | hyperband, or an Optuna pruner as
    #: {_target_: optuna.pruners.MedianPruner, n_startup_trials: 2}. Judged on rank 0 after every epoch.
    pruner: Any = "none"


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


def search_space(config: DictConfig) -> dict[str, str]:
    """{key: spec} of what a sweep varies: hydra.sweeper.params and the command line's sweeps."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    return {_key(o): _spec(o) for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}


class MpiSweeper(Sweeper):
    """Grid or Optuna trials, decided on rank 0 and run by every rank in lockstep (see the package doc)."""

    def __init__(self, mode: str = "grid", params: Optional[dict] = None, direction: str = "maximize",
                 n_trials: int = 20, sampler: Optional[dict] = None, storage: Optional[str] = None,
                 study_name: Optional[str] = None, enqueue: Optional[list] = None, pruner: Any = "none") -> None:
        super().__init__()
        self.mode, self.direction, self.n_trials = str(mode), str(direction), int(n_trials)
        self.params = dict(params or {})
        self.sampler, self.storage, self.study_name = sampler, storage, study_name
        self.enqueue = list(enqueue or [])
        self.pruner = pruner if isinstance(pruner, (dict, DictConfig)) else str(pruner or "none")
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        dist = Dist()
        try:
            if self.mode not in ("grid", "optuna"):
                raise SweepError(f"hydra.sweeper.mode must be grid or optuna, got {self.mode!r}")
            if self.direction not in ("maximize", "minimize"):
                raise SweepError(f"hydra.sweeper.direction must be maximize or minimize, got {self.direction!r}")
            if isinstance(self.pruner, str) and self.pruner not in PRUNERS:
                raise SweepError(f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)} or an Optuna pruner "
                                 f"({{_target_: optuna.pruners.MedianPruner, ...}}), got {self.pruner!r}")
            TRIAL.pruning = self.pruner != "none"  # every rank: the trials report each epoch (dpcnn.early_stop)
            args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
            if dist.is_root:
                sweep_dir = Path(str(self.config.hydra.sweep.dir))
                sweep_dir.mkdir(parents=True, exist_ok=True)
                OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            return self._grid(dist, args) if self.mode == "grid" else self._optuna(dist, args)
        except SweepError as e:  # raised on every rank at the same point
            report(str(e))
            sys.exit(e.exit_code)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:  # noqa: BLE001 - on this rank only: the others would wait forever
            traceback.print_exc()
            print(f"dpcnn: the sweep failed on rank {dist.rank}; aborting all ranks", file=sys.stderr, flush=True)
            dist.abort(1)

    # --- grid ------------------------------------------------------------------------
    def _grid(self, dist, args: list[str]) -> list:
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
        study = self._pruning_study(dist) if TRIAL.pruning else None  # rank 0's, for the pruner only
        results = []
        for num, job in enumerate(jobs):
            trial = TRIAL.pruner_trial = study.ask() if study is not None else None
            TRIAL.pruned_at = None
            results.append(self._launch(num, job))
            if trial is not None:
                self._tell(study, trial, float(results[-1].return_value))
        return results

    def _make_pruner(self):
        """The Optuna pruner ``hydra.sweeper.pruner`` names (rank 0)."""
        import optuna

        if not isinstance(self.pruner, str):
            return instantiate(self.pruner)
        return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
                "none": optuna.pruners.NopPruner}[self.pruner]()

    def _pruning_study(self, dist):
        """A grid sweep with a pruner: an in-memory Optuna study on rank 0 that only judges the trials."""
        study = None

        def create():
            nonlocal study
            import optuna

            study = optuna.create_study(direction=self.direction, pruner=self._make_pruner())
            log.info("grid sweep with %s: trials are judged after every epoch", type(study.pruner).__name__)

        dist.from_root(create, Exception, SweepError)
        return study

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

            parsed = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(args)
            space = {_key(o): _distribution(o) for o in parsed if o.is_sweep_override()}
            fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
            if not space:
                raise SweepError("nothing to search: give hydra.sweeper.params or sweeps such as "
                                 "'optimizer.lr=tag(log,interval(0.001,0.3))'")
            sampler = instantiate(self.sampler) if self.sampler else None
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                        direction=self.direction, load_if_exists=True, pruner=self._make_pruner())
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
                pending = TRIAL.pruner_trial = study.ask(space)
                TRIAL.pruned_at = None
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
                TRIAL.record_unlaunched(num, job, error)
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

        if TRIAL.pruned_at is not None:  # stopped by the pruner (dpcnn.early_stop): its last report stands
            study.tell(trial, state=TrialState.PRUNED)
        elif math.isfinite(value):
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
