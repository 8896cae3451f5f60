"""Data-parallel training: ``mpirun -n 4 python -m dpcnn.train [hydra overrides]``.

Every rank holds the same model. Each step, every rank computes the same
global batch indices, takes its contiguous shard, runs forward and backward,
and writes (sum of its gradients) / (global batch size) into the front of one
flat buffer; the step's loss, correct count and stop flags ride at the end of
that buffer. One in-place SUM Allreduce makes it the global-batch mean on
every rank, and every rank takes the same SGD step, so the ranks never drift.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import faults, sweep
from .data import EpochSampler, ensure_files, get_spec, load_data, random_shift, shift_offsets
from .dist import Dist
from .errors import ConfigError, DpcnnError
from .model import Model
from .optim import make_optimizer, make_schedule
from .outputs import RootOutputs
from .resume import Position, check_in_sync, resume, save_or_raise, start_identical
from .step import StepBuffer, shard_start

log = logging.getLogger("dpcnn")


def _conf_dir() -> str:
    """conf/ inside the installed package (wheel), else the checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"dpcnn's Hydra configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


class Diverged(DpcnnError):
    """The loss or the gradients stopped being finite."""


#: Set by SIGTERM/SIGINT on any rank; acted on at the next step boundary by all ranks together.
_signal_received: list[int] = []


def _on_signal(signum, frame):  # noqa: ARG001
    _signal_received.append(signum)


def stop_requested() -> bool:
    """A SIGTERM/SIGINT arrived on this rank."""
    return bool(_signal_received)


# ----------------------------------------------------------------------------- setup

def validate(cfg: DictConfig, world_size: int) -> None:
    """Checks that need no data and no model: fail in seconds, before any compute."""
    t = cfg.trainer
    if not (isinstance(t.epochs, int) and t.epochs >= 1):
        raise ConfigError(f"trainer.epochs must be an integer >= 1, got {t.epochs}")
    if t.max_steps is not None and not (isinstance(t.max_steps, int) and t.max_steps >= 1):
        raise ConfigError(f"trainer.max_steps must be an integer >= 1 or null, got {t.max_steps}")
    if not (isinstance(t.batch_size, int) and t.batch_size >= 1):
        raise ConfigError(f"trainer.batch_size must be a positive integer, got {t.batch_size}")
    if t.batch_size < world_size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is the GLOBAL batch and is smaller than the "
                          f"{world_size} ranks; use trainer.batch_size>={world_size} or fewer ranks")
    lr = cfg.optimizer.lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr}; e.g. optimizer.lr=0.05")
    micro = t.get("micro_batch")
    if micro is not None and not (isinstance(micro, int) and micro >= 1):
        raise ConfigError(f"trainer.micro_batch must be a positive integer or null, got {micro}")
    if t.dtype not in ("float32", "float64"):
        raise ConfigError(f"trainer.dtype must be float32 or float64, got {t.dtype}")
    get_spec(cfg.data)  # unknown dataset name


def load_on_all_ranks(cfg: DictConfig, dist: Dist):
    """Rank 0 finds or downloads the files while the others wait; then all ranks read them."""
    spec = get_spec(cfg.data)

    def fetch():
        if dist.is_root:
            ensure_files(spec, cfg.data.root, download=cfg.data.download,
                         verify_checksum=cfg.data.verify_checksum, progress=bool(cfg.trainer.progress))

    dist.agree(fetch)
    data_cfg = {**OmegaConf.to_container(cfg.data, resolve=True), "download": False, "verify_checksum": False}
    return dist.agree(lambda: load_data(data_cfg))


# --------------------------------------------------------------------- training

def train(cfg: DictConfig, dist: Dist) -> float:
    """Train as configured; returns the objective (validation accuracy if there is a split, else test)."""
    run_dir, t = Path(HydraConfig.get().runtime.output_dir), cfg.trainer
    dist.pin_blas_threads()
    # Setup. Every rank validates and builds the same things; an error anywhere stops all ranks.
    dist.agree(lambda: validate(cfg, dist.size))
    model, data, sampler, opt, lr_at = build(cfg, dist)
    # The LR schedule spans trainer.epochs; max_steps is a budget that stops early
    # without reshaping the schedule (so a run stopped and resumed matches one that was not).
    last_step = min(t.epochs * sampler.num_batches, t.max_steps or math.inf)
    step = StepBuffer(model, t.get("micro_batch"))
    pos, resumed_from = resume(cfg, dist, model, opt, run_dir) if t.resume else (Position(), None)
    start_identical(model, opt, dist)
    out = RootOutputs(cfg, dist, run_dir, interrupted=stop_requested)
    dist.agree(lambda: out.start(model, dist, resumed_from, data, pos.history))
    batch_of, fault = Batches(cfg, data, dist), faults.from_env(dist.rank)

    status, summary, stop = "FAILED", {}, False
    started = time.perf_counter() - (pos.history[-1].get("elapsed_s", 0.0) if pos.history else 0.0)
    try:
        while pos.epoch < t.epochs and pos.step < last_step:
            out.epoch_bar(pos.epoch, sampler.num_batches, pos.batch)
            stats = EpochStats()
            for k, gsize, idx in sampler.local_batches(pos.epoch, dist.rank, dist.size, start=pos.batch):
                t0 = time.perf_counter()
                with reported_as_step_error(step, dist.rank, pos.step):
                    if fault:
                        fault.maybe_fire(dist.rank, pos.step, stop_requested)
                    step.shard_gradient(*batch_of(pos.epoch, k, gsize, idx), gsize, shard_start(gsize, dist))
                step.request_stop(stop_requested())
                t1 = time.perf_counter()
                step.reduce(dist)  # the step's one collective: mean gradient + metrics + flags
                t2 = time.perf_counter()
                raise_if_failed(step, pos, cfg.optimizer.lr, run_dir)
                opt.step(step.grad, lr_at(pos.step))
                pos.step, pos.batch = pos.step + 1, k + 1
                stop = stop or step.stop  # a signal on any rank stops all of them here
                stats.add(gsize, step.loss, step.correct, time.perf_counter() - t0, t2 - t1)
                out.step(pos.step, step.loss, step.correct / gsize, stats.img_per_s)
                if stop or pos.step >= last_step:
                    break
                if t.get("checkpoint_every") and pos.step % t.checkpoint_every == 0:
                    save_or_raise(out, model, opt, pos, dist)
            if pos.batch == sampler.num_batches:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            if stats.seen:
                summary = end_epoch(model, data, dist, out, pos, stats, started, t.eval_batch_size)
            check_in_sync(model, dist)
            save_or_raise(out, model, opt, pos, dist)
            if stop:
                status = "KILLED"
                log.warning("stopped by signal at step %d; checkpoint written. Resume with trainer.resume=auto "
                            "hydra.run.dir=%s", pos.step, run_dir)
                raise SystemExit(143)
        status = "FINISHED"
    finally:
        out.finish(status, model, summary)
    objective = "val_acc" if data.val is not None else "test_acc"
    return float(summary.get(objective, float("nan")))


def build(cfg: DictConfig, dist: Dist):
    """The model, the data, the sampler, the optimizer and the LR schedule, the same on every rank."""
    t = cfg.trainer
    model = dist.agree(lambda: Model.from_config(OmegaConf.to_container(cfg.model.layers, resolve=True),
                                                 num_classes=cfg.data.num_classes, seed=cfg.seed,
                                                 dtype=np.dtype(t.dtype), init=cfg.model.get("init", "fan_in_uniform")))
    data = load_on_all_ranks(cfg, dist)
    if model.input_shape != data.train[0].shape[1:]:
        raise ConfigError(f"model input {model.input_shape} does not match the data's {data.train[0].shape[1:]}")
    sampler = EpochSampler(len(data.train[0]), t.batch_size, seed=cfg.seed, drop_last=t.drop_last)
    lr_at = dist.agree(lambda: make_schedule(cfg.optimizer, sampler.num_batches, t.epochs * sampler.num_batches))
    opt = dist.agree(lambda: make_optimizer(model.params, cfg.optimizer))
    return model, data, sampler, opt, lr_at


class Batches:
    """``batches(epoch, k, global_size, idx)``: this rank's (x, y) of global batch k, augmented if configured."""

    def __init__(self, cfg: DictConfig, data, dist: Dist):
        self.x, self.y = data.train
        self.background, self.seed, self.rank, self.size = data.background, cfg.seed, dist.rank, dist.size
        augment = cfg.data.get("augment") or {}
        self.max_shift = int(augment.get("max_shift", 2)) if augment.get("enabled") else None

    def __call__(self, epoch: int, k: int, global_size: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.x[idx], self.y[idx]
        if self.max_shift is not None:
            # Offsets are drawn for the whole global batch, then sharded: the same at every world size.
            shifts = shift_offsets(self.seed, epoch, k, global_size, self.max_shift)
            x = random_shift(x, EpochSampler.shard(shifts, self.rank, self.size), self.background)
        return x, y


@contextlib.contextmanager
def reported_as_step_error(step: StepBuffer, rank: int, at: int):
    """Clear the step's slots; an exception inside is printed and flagged in the ERROR slot, so every
    rank learns of it at the step's reduction and all stop together instead of hanging."""
    step.clear_slots()
    try:
        yield
    except Exception:  # noqa: BLE001 - reported here, then every rank stops together
        step.fail(rank, at)


def raise_if_failed(step: StepBuffer, pos: Position, lr: float, run_dir: Path) -> None:
    """After the reduction: a failed rank, or a loss/gradient that is no longer finite, stops every rank."""
    if step.error:
        raise DpcnnError(f"a rank failed at step {pos.step} (see its error above); the last "
                         f"checkpoint is intact, resume with trainer.resume=auto hydra.run.dir={run_dir}")
    if not (math.isfinite(step.loss) and np.isfinite(step.grad.sum())):
        raise Diverged(f"training diverged at step {pos.step}, epoch {pos.epoch + 1}: loss is "
                       f"{step.loss}; lower optimizer.lr (now {lr}), e.g. optimizer.lr={lr / 10:g}")


def end_epoch(model: Model, data, dist: Dist, out: RootOutputs, pos: Position, stats, started: float,
              eval_batch_size: int) -> dict:
    """Evaluate, append the epoch's metrics to the history, report them; returns the summary metrics."""
    metrics = {"epoch": pos.epoch if pos.batch == 0 else pos.epoch + 1, "step": pos.step,
               **stats.metrics(),
               **evaluate_splits(model, data, dist, eval_batch_size),
               "elapsed_s": time.perf_counter() - started,  # wall time of training so far
               "peak_rss_mb": max(dist.allgather(_peak_rss_mb()))}  # the largest rank
    pos.history.append(metrics)
    out.epoch(metrics, pos.step)
    return {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss"))}


# -------------------------------------------------------------------- evaluation

def evaluate(model: Model, x: np.ndarray, y: np.ndarray, dist: Dist, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over all of (x, y): each rank scores a slice, sums are allreduced."""
    mine = EpochSampler.shard(np.arange(len(x)), dist.rank, dist.size)
    sums = np.zeros(2, np.float64)  # loss sum, correct
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        logits = model.forward(x[idx], train=False)
        sums[0] += model.loss.forward(logits, y[idx], denom=1)
        sums[1] += (logits.argmax(1) == y[idx]).sum()
    dist.allreduce_sum_(sums)
    return sums[0] / len(x), sums[1] / len(x)


@dataclass
class EpochStats:
    """Running totals of one epoch's steps (global figures: every rank has the same)."""

    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    step_time: float = 0.0
    comm_time: float = 0.0

    def add(self, batch: int, mean_loss: float, correct: int, step_time: float, comm_time: float) -> None:
        self.seen += batch
        self.loss_sum += mean_loss * batch
        self.correct += correct
        self.step_time += step_time
        self.comm_time += comm_time

    @property
    def img_per_s(self) -> float:
        return self.seen / self.step_time if self.step_time else 0.0

    def metrics(self) -> dict:
        return {"train_loss": self.loss_sum / self.seen, "train_acc": self.correct / self.seen,
                "img_per_s": self.img_per_s, "allreduce_frac": self.comm_time / self.step_time,
                "step_time_s": self.step_time}


def evaluate_splits(model: Model, data, dist: Dist, batch_size: int) -> dict:
    """test (and, with a validation split, val) loss and accuracy."""
    out = dict(zip(("test_loss", "test_acc"), evaluate(model, *data.test, dist, batch_size)))
    if data.val is not None:
        out.update(zip(("val_loss", "val_acc"), evaluate(model, *data.val, dist, batch_size)))
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ entry points

@hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float:
    dist = Dist()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        # In a sweep every rank must be running the same trial (else SweepError ends the sweep on all
        # ranks); a trial that already ran in this sweep returns its recorded objective untrained.
        recorded = sweep.begin_trial(cfg, dist) if multirun else None
        objective = recorded if recorded is not None else train(cfg, dist)
    except sweep.SweepError:
        raise
    except DpcnnError as e:
        # Every rank got here together (agreed errors, or flags reduced with the step).
        print(f"dpcnn: error: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(1)
        sweep.note_failure(e)
        objective = float("nan")  # this trial failed (FAILED in MLflow and Optuna); the sweep goes on
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - a bug or an error on this rank only: no rank may hang
        traceback.print_exc()
        print(f"dpcnn: rank {dist.rank} crashed; aborting all ranks", file=sys.stderr, flush=True)
        dist.abort(1)
    # The value the sweeper sees: allreduced by training, verified identical on every rank.
    return sweep.end_trial(objective, dist) if multirun else objective


def _share_run_stamp() -> None:
    """Rank 0 decides the run directory's timestamp and every rank uses it (Hydra's ${now:} differs)."""
    dist = Dist()
    if "DPCNN_RUN_STAMP" not in os.environ:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S") if dist.is_root else None
        os.environ["DPCNN_RUN_STAMP"] = dist.bcast(stamp)
    if not dist.is_root:
        # Only rank 0 writes .hydra/ and the log file; the others print warnings and errors.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra/hydra_logging=disabled",
                     "hydra.job_logging.root.level=WARNING"]


def main() -> None:
    """``python -m dpcnn.train`` / ``dpcnn-train``."""
    # First thing: a SIGTERM (Slurm pre-emption) during start-up must become a clean
    # stop at the first step boundary, not a dead rank.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    if os.environ.get("HYDRA_FULL_ERROR") is None:
        logging.captureWarnings(True)
    _share_run_stamp()
    _hydra_entry()


if __name__ == "__main__":
    main()
