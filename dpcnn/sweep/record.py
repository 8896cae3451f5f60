"""`SweepCallback`: the sweep's MLflow parent run, its trial records, and the summary at the end (rank 0)."""

from __future__ import annotations

import atexit
import csv
import json
import logging
import math
import os
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..dist import world_rank_and_size
from ..store import default_uri, experiment_id, open_client, retry, why
from ..tracking import ENV_PARENT, ENV_TAGS, MlflowTracker
from ..tracking_inputs import flatten
from ..viz import summary_plot
from .sweeper import search_space
from .trial import TRIAL, config_digest, digest, objective_name

log = logging.getLogger("dpcnn.sweep")

TERMINAL_OK = ("FINISHED", "FAILED", "PRUNED")  # outcomes a resumed sweep does not train again


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

    def __init__(self, resume: bool = True, plot: bool = True) -> None:
        self.resume, self.plot = bool(resume), bool(plot)
        self.on = False
        self.tracker: MlflowTracker | None = None

    # --- MLflow, never fatal ---------------------------------------------------------
    def _safe(self, what: str, fn, *args, **kwargs):
        """``fn(...)``, waiting out a brief outage (``tracking.trial_wait``, not again once one wait expired)."""
        if self.client is None:
            return None
        try:
            result = retry(lambda: fn(*args, **kwargs), f"the sweep's {what}", 0 if self.gave_up else self.wait,
                           self.uri)
            self.gave_up = False
            return result
        except Exception as e:  # noqa: BLE001 - tracking must not stop the sweep
            self.gave_up = True
            log.warning("sweep: MLflow %s failed (%s)", what, why(e))
            return None

    # --- hooks -----------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        rank, self.world_size = world_rank_and_size()
        if rank != 0:
            return
        self.on, TRIAL.recorder = True, self
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
        self.client = self.parent = self.tracker = None
        tracking = config.get("tracking") or {}
        self.wait, self.gave_up = float(tracking.get("trial_wait", 120.0)), False
        if tracking.get("backend", "mlflow") not in (None, "none"):
            try:
                self._start_parent(config, tracking)
            except Exception as e:  # noqa: BLE001
                log.warning("sweep: no MLflow parent run (%s); trials are tracked as separate runs", why(e))
                self.client = self.parent = self.tracker = None
        atexit.register(self._cut_short)

    def _start_parent(self, config: DictConfig, tracking) -> None:
        self.uri = tracking.get("uri") or default_uri()
        self.client = open_client(self.uri)
        name = tracking.get("experiment", "dpcnn")
        self.experiment_id = experiment_id(self.client, name)
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
                if run.data.tags.get("dpcnn.sweep.pruned"):  # ended KILLED by the pruner: done, not cut short
                    status = "PRUNED"
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
            self._attach(tracking).set_tags({"dpcnn.sweep.resumed": str(resumed), **tags})
            log.info("sweep: resuming sweep %s in MLflow run %s: %d recorded trial(s) are not trained again "
                     "(hydra.callbacks.sweep.resume=false trains everything anew)", self.key, self.parent,
                     sum(p["status"] in TERMINAL_OK for p in self.previous.values()))
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"sweep-{self.mode}-{self.key[:6]}", tags=tags)
            self.parent = run.info.run_id
            self._attach(tracking)
            params = {"sweeper": "dpcnn " + self.mode + (f" ({sampler.get('_target_', '?').rsplit('.', 1)[-1]}, "
                                                         f"seed {sampler.get('seed')})" if sampler else ""),
                      "sweep.mode": self.mode, "sweep.direction": self.direction, "sweep.objective": self.objective,
                      **({"sweep.sampler": json.dumps(sampler, sort_keys=True)} if sampler else {}),
                      **{f"search.{k}": v for k, v in self.space.items()}}
            self.tracker.log_params({k: str(v)[:6000] for k, v in params.items()})
        os.environ[ENV_PARENT] = self.parent

    def _attach(self, tracking) -> MlflowTracker:
        """The parent's own records go through a tracker: never blocking, journaled in the sweep directory."""
        self.tracker = MlflowTracker(self.uri, tracking.get("experiment", "dpcnn"), self.sweep_dir,
                                     flush_timeout=float(tracking.get("flush_timeout", 60.0)),
                                     retry_interval=float(tracking.get("retry_interval", 5.0)))
        self.tracker.attach(self.parent)
        return self.tracker

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
            TRIAL.skip = (prev["objective"], prev["run_id"])  # begin_trial shares it with every rank
            return
        tags = {"dpcnn.sweep.key": self.key, "dpcnn.sweep.trial": str(num), "dpcnn.sweep.trial_key": key,
                "dpcnn.sweep.attempt": self.current["attempt"], "dpcnn.sweep.overrides": " ".join(overrides)[:5000]}
        if prev:
            tags["dpcnn.sweep.retry_of" if self.resume else "dpcnn.sweep.duplicate_of"] = prev["run_id"]
        os.environ[ENV_TAGS] = json.dumps(tags)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
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
        infra, error = TRIAL.infra, TRIAL.take_error()
        # A trial the infrastructure failed (the tracking store) is KILLED: a re-run of the sweep trains it again.
        status = "FINISHED" if math.isfinite(value) else "KILLED" if infra else "FAILED"
        record = TrialRecord(cur["num"], cur["overrides"], {k: _trial_value(config, k) for k in self.space},
                             cur["key"], value, status, None, reused=cur["reused"], error=error,
                             config_yaml=_yaml(job_return.cfg))
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
            elif status != "FINISHED":  # (a trial that ran has its run, even if the store could not say so now)
                record.run_id = self._failed_child(cur["num"], cur["key"], cur["overrides"], error, config,
                                                   cur["prev"], cur["attempt"], status)
            if TRIAL.pruned_at is not None:  # the run is KILLED and tagged dpcnn.sweep.pruned (dpcnn.early_stop)
                record.status = "PRUNED"
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
        run_id = self._failed_child(num, key, job, error, None, None, uuid.uuid4().hex, "FAILED")
        self._add(TrialRecord(num, job, {}, key, float("nan"), "FAILED", run_id, error=error))

    def _failed_child(self, num, key, overrides, error, config, prev, attempt, status) -> str | None:
        """A FAILED (or, failed by the infrastructure, KILLED) child run for a trial whose own run never started."""
        if self.client is None:
            return None
        from mlflow.entities import Param

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
        self._safe("status", self.client.set_terminated, run.info.run_id, status)
        return run.info.run_id

    def _add(self, record: TrialRecord) -> None:
        self.records.append(record)
        best = self._best()
        log.info("sweep: trial %d %s: %s %r%s", record.number, record.status, self.objective, record.objective,
                 f" (best so far: trial {best.number}, {best.objective:.4f})" if best else "")
        if self.tracker is not None and math.isfinite(record.objective):
            self.tracker.log_metrics({"trial_objective": record.objective, f"best_{self.objective}": best.objective},
                                     step=record.number)

    def _best(self) -> TrialRecord | None:
        ok = [r for r in self.records if math.isfinite(r.objective)]
        if not ok:
            return None
        return (max if self.direction == "maximize" else min)(ok, key=lambda r: r.objective)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.on:
            return
        self.on, TRIAL.recorder = False, None
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
        n_failed = sum(r.status not in ("FINISHED", "PRUNED") for r in self.records)
        n_pruned = sum(r.status == "PRUNED" for r in self.records)
        tags = {"dpcnn.sweep.trials": str(len(self.records)), "dpcnn.sweep.failed": str(n_failed),
                "dpcnn.sweep.pruned": str(n_pruned),
                "dpcnn.sweep.reused": str(sum(r.reused for r in self.records))}
        infra = TRIAL.infra_failed or []
        if infra:  # a "best" of the survivors would be a lie: the sweep is incomplete, and says how to finish it
            tags["dpcnn.sweep.infra_failed"] = ",".join(map(str, infra))
            print(f"dpcnn: error: sweep incomplete: trial(s) {', '.join(map(str, infra))} of {len(self.records)} "
                  "could not run because the tracking store was unreachable; no best is reported. Run the same "
                  "command again: the sweep resumes and trains only those", file=sys.stderr, flush=True)
        elif best is not None:
            files += self._write_best(best, tags)
            where = f" (MLflow run {best.run_id})" if best.run_id else ""
            print(f"dpcnn: sweep done: {len(self.records)} trial(s), {n_failed} failed, {n_pruned} pruned; "
                  f"best is trial {best.number} with {self.objective} {best.objective:.4f}{where}. To train it:\n  "
                  f"{command_for(best.overrides, self.world_size)}", flush=True)
        else:
            print(f"dpcnn: sweep done: all {len(self.records)} trial(s) failed", flush=True)
        if self.tracker is not None:
            self.tracker.set_tags(tags)
            if best is not None and not infra:
                self.tracker.log_metrics({f"best_{self.objective}": best.objective}, step=0)
            for f in files:
                self.tracker.log_artifact(f)
            # Waits (tracking.flush_timeout) for the server; what it does not take stays in the sweep's journal.
            self.tracker.end("FINISHED" if best is not None and not infra else "FAILED")

    def _write_best(self, best: TrialRecord, tags: dict) -> list[Path]:
        """best_command.txt and best_config.yaml in the sweep directory; the best trial's tags into ``tags``."""
        command = command_for(best.overrides, self.world_size)
        (self.sweep_dir / "best_command.txt").write_text(command + "\n")
        files = [self.sweep_dir / "best_command.txt"]
        if best.config_yaml:
            (self.sweep_dir / "best_config.yaml").write_text(best.config_yaml)
            files.append(self.sweep_dir / "best_config.yaml")
        tags.update({"dpcnn.sweep.best_trial": str(best.number), "dpcnn.sweep.best_run_id": best.run_id or "",
                     f"dpcnn.sweep.best_{self.objective}": repr(best.objective),
                     "dpcnn.sweep.best_overrides": " ".join(best.overrides)[:5000],
                     "dpcnn.sweep.best_command": command[:5000]})
        return files

    def _cut_short(self) -> None:
        """At exit without on_multirun_end (an error or a signal ended the sweep): the parent is KILLED."""
        if self.on and self.tracker is not None:
            self.tracker.end("KILLED", wait=min(5.0, self.tracker.flush_timeout))

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
