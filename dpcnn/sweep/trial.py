"""One trial, on every rank: the same config everywhere in, the same objective everywhere out.

`begin_trial` / `note_failure` / `end_trial` are called by the task function
(`dpcnn.train`) on every rank; see the package doc.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

from omegaconf import DictConfig, OmegaConf

from ..errors import DpcnnError

log = logging.getLogger("dpcnn.sweep")

#: DPCNN_SWEEP_AUDIT=1: every rank prints what each trial returned to the sweeper (for tests and doubts).
ENV_AUDIT = "DPCNN_SWEEP_AUDIT"


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
