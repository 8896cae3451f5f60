"""Where training is, and getting back there: the position, checkpoints written by rank 0
with the error shared, resume, and the check that every rank holds the same weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .dist import Dist
from .errors import ConfigError, DpcnnError
from .model import Model

log = logging.getLogger("dpcnn")


@dataclass
class Position:
    """Where training is: what a resume needs besides the arrays."""

    epoch: int = 0
    batch: int = 0          # next global batch within the epoch
    step: int = 0           # optimizer steps taken
    history: list = field(default_factory=list)  # per-epoch metrics


def save_or_raise(out, model: Model, opt, pos: Position, dist: Dist) -> None:
    """Rank 0 writes the checkpoint (``out`` is the `RootOutputs`); a failure there stops every
    rank with its message."""
    error = dist.bcast(out.save(model, opt.state(), pos))
    if error:
        raise DpcnnError(error)


def start_identical(model: Model, opt, dist: Dist) -> None:
    """Every rank takes rank 0's parameters and optimizer state, whatever its seed or checkpoint."""
    dist.broadcast_(model.params)
    for arr in opt.state().values():
        dist.broadcast_(arr)


def check_in_sync(model: Model, dist: Dist) -> None:
    """Ranks must hold bitwise-identical parameters; verify with one small allgather."""
    digests = dist.allgather(hashlib.blake2b(model.params.tobytes(), digest_size=16).hexdigest())
    if len(set(digests)) != 1:
        raise DpcnnError("ranks' parameters differ (non-deterministic reduction?); please report this with "
                         "your MPI library and world size")


def resume(cfg, dist: Dist, model: Model, opt, run_dir: Path) -> tuple[Position, dict | None]:
    """Load a checkpoint on rank 0 and share it; returns the position to continue from."""
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
        model.params[:] = ckpt.params
        opt.load_state(ckpt.optimizer)
        return ckpt.meta

    meta = dist.bcast(dist.agree(read))
    if not meta:
        return Position(), None
    log.info("resuming from %s at step %d (epoch %d, batch %d)", path, meta["step"], meta["epoch"] + 1, meta["batch"])
    pos = Position(epoch=meta["epoch"], batch=meta["batch"], step=meta["step"], history=meta.get("history", []))
    return pos, {"path": str(path), "step": meta["step"], "mlflow_run_id": meta.get("mlflow_run_id")}
