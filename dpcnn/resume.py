"""Where training is, and getting back there: the position, checkpoints written by rank 0
with the error shared, resume, and the check that every rank holds the same weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from . import checkpoint
from .dist import Dist
from .errors import ConfigError, DpcnnError
from .model import Model

#: What fixes the order of the data and the meaning of (epoch, batch): a resume that changes one of
#: them would skip or repeat images, so it is an error unless trainer.resume_strict=false.
POSITION_KEYS = ("trainer.batch_size", "trainer.drop_last", "seed", "data.name", "data.train_subset",
                 "data.val_fraction", "data.val_seed")

log = logging.getLogger("dpcnn")


@dataclass
class Position:
    """Where training is: what a resume needs besides the arrays."""

    epoch: int = 0
    batch: int = 0          # next global batch within the epoch
    step: int = 0           # optimizer steps taken
    history: list = field(default_factory=list)  # per-epoch metrics
    saved_step: int | None = None  # the step of the newest checkpoint on disk (known to every rank)


def save_or_raise(out, model: Model, opt, pos: Position, dist: Dist, step=None) -> None:
    """Rank 0 writes the checkpoint (``out`` is the `RootOutputs`); a failure there stops every
    rank with its message. ``step`` (the `StepBuffer`) adds every rank's gradient-compression
    residual (gathered: every rank calls this)."""
    comm = step.reducer.state(dist) if step is not None and step.reducer is not None else {}
    error, saved = dist.bcast(out.save(model, {**opt.state(), **comm}, pos), what="checkpoint")
    if error:
        raise DpcnnError(error)
    if saved:
        pos.saved_step = pos.step


def position_changes(meta: dict, cfg) -> list[str]:
    """``key: checkpoint value -> new value`` for every `POSITION_KEYS` entry that differs."""
    try:
        old = OmegaConf.create(meta.get("config") or "{}")
    except Exception:  # noqa: BLE001 - a checkpoint without a readable config cannot be compared
        return []
    changes = []
    for key in POSITION_KEYS:
        before, now = OmegaConf.select(old, key, default=None), OmegaConf.select(cfg, key, default=None)
        if before != now:
            changes.append(f"{key}={before} (now {now})")
    return changes


def check_in_sync(model: Model, dist: Dist) -> None:
    """Ranks must hold bitwise-identical parameters; verify with one small allgather."""
    digests = dist.allgather(hashlib.blake2b(model.params.tobytes(), digest_size=16).hexdigest(), "checkpoint")
    if len(set(digests)) != 1:
        raise DpcnnError("ranks' parameters differ (non-deterministic reduction?); please report this with "
                         "your MPI library and world size")


def resume(cfg, dist: Dist, model: Model, opt, run_dir: Path, step=None) -> tuple[Position, dict | None]:
    """Every rank continues from rank 0's state: the checkpoint of ``trainer.resume`` if there is one,
    else rank 0's fresh weights. Returns the position and what it resumed from (or None). ``step``
    (the `StepBuffer`) gets each rank's gradient-compression residual back."""
    residual: list = [None]  # rank 0: the checkpoint's per-rank residuals, if it has them
    pos, resumed_from = _load(cfg, dist, model, opt, run_dir, residual) if cfg.trainer.resume else (Position(), None)
    dist.broadcast_(model.params)
    for arr in opt.state().values():
        dist.broadcast_(arr)
    if step is not None and step.reducer is not None:
        note = step.reducer.load_state(residual[0], dist)
        if note and dist.is_root:
            log.warning("%s", note)
    return pos, resumed_from


def _load(cfg, dist: Dist, model: Model, opt, run_dir: Path, residual: list) -> tuple[Position, dict | None]:
    """Load a checkpoint on rank 0 and share its metadata; returns the position to continue from."""
    path = Path(str(cfg.trainer.resume))
    if str(cfg.trainer.resume) == "auto":
        path = run_dir / "checkpoints" / checkpoint.LAST

    def read():
        if not dist.is_root:
            return None
        if str(cfg.trainer.resume) == "auto" and not path.exists():
            return {}
        ckpt = checkpoint.load(path)
        if ckpt.params.shape != model.params.shape:
            raise ConfigError(f"{path}: checkpoint has {ckpt.params.size:,} parameters, the model "
                              f"{model.num_params:,}; resume with the model config it was trained with")
        changed = position_changes(ckpt.meta, cfg)
        if changed and cfg.trainer.resume_strict:
            raise ConfigError(f"{path} was trained with {', '.join(changed)}: resuming would skip or repeat images; "
                              "resume with the checkpoint's values, or set trainer.resume_strict=false to "
                              "restart the interrupted epoch with the new ones")
        model.params[:] = ckpt.params
        opt.load_state(ckpt.optimizer)
        residual[0] = ckpt.optimizer.get("grad_residual")
        return {**ckpt.meta, "changed": changed}

    meta = dist.bcast(dist.agree(read))
    if not meta:
        return Position(), None
    log.info("resuming from %s at step %d (epoch %d, batch %d)", path, meta["step"], meta["epoch"] + 1, meta["batch"])
    pos = Position(epoch=meta["epoch"], batch=meta["batch"], step=meta["step"], history=meta.get("history", []),
                   saved_step=meta["step"])
    if meta["changed"] and pos.batch:
        log.warning("trainer.resume_strict=false and %s: epoch %d starts again from its first image (its first "
                    "%d batches are trained again with the new order)", ", ".join(meta["changed"]), pos.epoch + 1,
                    pos.batch)
        pos.batch = 0
    return pos, {"path": str(path), "step": meta["step"], "mlflow_run_id": meta.get("mlflow_run_id")}
