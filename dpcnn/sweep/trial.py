"""One trial, on every rank: the same config everywhere in, the same objective everywhere out.

`begin_trial` / `note_failure` / `end_trial` are called by the task function
(`dpcnn.train`) on every rank; see the package doc. `TrialState` is what the
sweeper, the callback and the task function tell each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..config import objective_name
from ..errors import EXIT_USAGE, DpcnnError

if TYPE_CHECKING:  # the callback imports this module
    from .record import SweepCallback

log = logging.getLogger("dpcnn.sweep")

#: DPCNN_SWEEP_AUDIT=1: every rank prints what each trial returned to the sweeper (for tests and doubts).
ENV_AUDIT = "DPCNN_SWEEP_AUDIT"


class SweepError(DpcnnError):
    """The ranks of a sweep disagree (or the sweep cannot start): ends the sweep, on every rank."""

    exit_code = EXIT_USAGE  # a sweep that cannot run the same trials on every rank: fix it first


def digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def config_digest(cfg: DictConfig) -> str:
    """Hash of a trial's composed config, without ``hydra`` and unresolved (so ``${oc.env:..}`` stays a formula)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return digest(container)




# ------------------------------------------------------------ per trial, on every rank

@dataclass
class TrialState:
    """What the sweep's three parts tell each other inside one process (one rank), between Hydra's calls.

    Hydra calls the sweeper, the callback and the task function in turn and
    passes nothing from one to the other, so they share the one `TRIAL` of this
    process, imported explicitly by each part. Who writes and who reads what:

    - ``num``, ``digest``: `begin_trial` (every rank); read by `end_trial` for
      its messages and the audit line.
    - ``skip``: ``(objective, run_id)`` of a config this sweep already ran, set by
      `SweepCallback.on_job_start` (rank 0); `begin_trial` takes it and shares it
      with every rank, and the trial is not trained again.
    - ``error``, ``infra``: `note_failure` (the task function); `SweepCallback.on_job_end`
      takes them for the trial's FAILED record (KILLED, to be trained again, when ``infra``).
    - ``infra_failed``: the trials whose failure was the infrastructure's (every rank); read by
      `SweepCallback.on_multirun_end` (no "best") and `dpcnn.train.main` (exit 1).
    - ``recorder``: the `SweepCallback` of the sweep running in this process
      (rank 0, between multirun start and end; None elsewhere); `MpiSweeper`
      hands it the trials that did not even compose.
    - ``pruning``: the sweep has a pruner (`MpiSweeper`, every rank, the same
      value); ``pruner_trial``: the Optuna trial of the running job, which the
      pruner judges (`MpiSweeper`, rank 0; None elsewhere).
    - ``pruned_at``: the epoch at which the pruner stopped this trial (`report_epoch`,
      every rank; reset by `begin`); read by `MpiSweeper` (tells Optuna PRUNED)
      and `SweepCallback.on_job_end` (records it PRUNED).
    """

    num: int | None = None
    digest: str | None = None
    skip: tuple[float, str] | None = None
    error: str | None = None
    recorder: SweepCallback | None = None
    pruning: bool = False
    pruner_trial: object | None = None
    pruned_at: int | None = None
    infra: bool = False     # this trial's failure was the infrastructure's (the tracking store), not its config
    infra_failed: list[int] | None = None  # such trials of this sweep, on every rank (dpcnn.train exits 1)

    def begin(self, cfg: DictConfig, dist) -> float | None:
        """Check that every rank composed the same trial; returns a recorded objective if it need not be trained.

        Collective: every rank calls it first thing in a multirun job.
        """
        num = HydraConfig.get().job.num
        mine = config_digest(cfg)
        digests = dist.allgather(mine)
        if len(set(digests)) != 1:
            raise SweepError(f"trial {num}: the ranks composed different configs (config hash by rank: "
                             f"{', '.join(digests)}); every rank must run the same checkout of dpcnn with the same "
                             "conf/ files, command line and environment")
        skip, compared = None, None
        if dist.is_root:
            skip, self.skip = self.skip, None
            compared = self.recorder.objective if self.recorder is not None else None
        self.num, self.digest, self.error, self.infra, self.pruned_at = num, mine, None, False, None
        skip, compared = dist.bcast((skip, compared))
        if compared is not None and objective_name(cfg) != compared:
            raise SweepError(f"trial {num} would return {objective_name(cfg)} but the sweep compares {compared}: "
                             "sweep data.val_fraction over values that are all > 0 (or all 0), never both")
        if skip is None:
            return None
        value, run_id = skip
        log.info("trial %d: this config already ran in this sweep (MLflow run %s, objective %r); not trained again",
                 num, run_id, value)
        return float(value)

    def report_epoch(self, value: float, epoch: int, dist, last: bool = False) -> bool:
        """Report a trial's per-epoch objective to the sweep's pruner; True if the trial is pruned now.

        Collective when the sweep has a pruner (every rank calls it after the same
        epoch, with the same allreduced value): rank 0's Optuna trial records the
        value and decides, and the verdict is broadcast, so every rank learns it at
        this epoch boundary. ``last``: the trial's final epoch (reported, never pruned).
        """
        if not self.pruning:
            return False

        def decide() -> bool:
            trial = self.pruner_trial
            if trial is None or not math.isfinite(value):
                return False
            trial.report(float(value), int(epoch))
            return not last and bool(trial.should_prune())

        pruned = dist.from_root(decide, Exception, SweepError)
        if pruned:
            self.pruned_at = int(epoch)
        return pruned

    def note_failure(self, error: BaseException) -> None:
        """The trial failed with a reported error (it returns NaN); remembered for its FAILED record."""
        self.error = f"{type(error).__name__}: {error}"
        self.infra = bool(getattr(error, "infrastructure", False))
        if self.infra:
            self.infra_failed = [*(self.infra_failed or []), self.num]

    def take_error(self) -> str | None:
        """The error `note_failure` noted for this trial, if any (and forget it)."""
        error, self.error = self.error, None
        return error

    def end(self, objective: float, dist) -> float:
        """The value handed back to the sweeper; verified bitwise identical on every rank. Collective."""
        objective = float(objective)
        values = dist.allgather(repr(objective))
        if len(set(values)) != 1:
            raise SweepError(f"trial {self.num}: the ranks computed different objectives ({', '.join(values)}); "
                             "the metric must come from the allreduce")
        if os.environ.get(ENV_AUDIT):
            # One write per line, so lines from different ranks do not interleave in mpirun's output.
            sys.stdout.write(f"dpcnn-sweep-audit trial={self.num} rank={dist.rank} "
                             f"config={self.digest} objective={objective!r}\n")
            sys.stdout.flush()
        return objective

    def record_unlaunched(self, num: int, job: list[str], error: str) -> None:
        """A trial that could not even be composed still gets its FAILED record (rank 0's callback)."""
        if self.recorder is not None:
            self.recorder.record_unlaunched(num, job, error)


#: The one TrialState of this process, shared by `MpiSweeper`, `SweepCallback` and the task function.
TRIAL = TrialState()

# What the task function (dpcnn.train) calls, on every rank.
begin_trial = TRIAL.begin
note_failure = TRIAL.note_failure
end_trial = TRIAL.end
