"""Data-parallel training: ``mpirun -n 4 python -m dpcnn.train [hydra overrides]``.

Every rank holds the same model. Each step, every rank computes the same
global batch indices, takes its contiguous shard, runs forward and backward,
and writes (sum of its gradients) / (global batch size) into the front of one
flat buffer; the step's loss, correct count and stop flags ride at the end of
that buffer. One in-place SUM Allreduce makes it the global-batch mean on
every rank, and every rank takes the same SGD step, so the ranks never drift.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import __version__, checkpoint, sweep
from .data import EpochSampler, ensure_files, get_spec, load_data, random_shift, shift_offsets
from .dist import Dist
from .errors import ConfigError, DpcnnError
from .model import Model
from .optim import make_optimizer, make_schedule
from .tracking import dataset_input, flatten, make_tracker, mark_run

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


# Slots after the gradients in the step buffer, summed over ranks by the step's Allreduce.
LOSS, CORRECT, STOP, ERROR = range(4)
#: Set by SIGTERM/SIGINT on any rank; acted on at the next step boundary by all ranks together.
_signal_received: list[int] = []


def _on_signal(signum, frame):  # noqa: ARG001
    _signal_received.append(signum)


@dataclass
class Position:
    """Where training is: what a resume needs besides the arrays."""

    epoch: int = 0
    batch: int = 0          # next global batch within the epoch
    step: int = 0           # optimizer steps taken
    history: list = field(default_factory=list)  # per-epoch metrics


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


# ------------------------------------------------------------------ rank-0 outputs

class RootOutputs:
    """Every side effect that only rank 0 performs: MLflow, checkpoints, progress.

    Built on every rank; on the others each method is a no-op, so the training
    loop has no ``if rank == 0`` in it.
    """

    def __init__(self, cfg: DictConfig, dist: Dist, run_dir: Path):
        self.enabled, self.cfg, self.run_dir = dist.is_root, cfg, run_dir
        self.tracker = make_tracker(cfg.tracking, run_dir, dist.is_root)
        self.ckpt_dir = run_dir / "checkpoints"
        self.bar = None

    def start(self, model: Model, dist: Dist, resumed_from: dict | None, data=None,
              history: list | None = None) -> None:
        """``data`` (the `dpcnn.data.Splits`) is logged as the run's dataset inputs and, at the end,
        its test split feeds the confusion matrix, activation maps and misclassified examples.
        ``history`` is the training loop's list of per-epoch metrics (resumed ones included),
        which the learning curves draw."""
        if not self.enabled:
            return
        self.data, self.history = data, history if history is not None else []
        log.info("model %s (%s parameters), data %s, %d rank(s), global batch %d\n%s",
                 self.cfg.model.name, f"{model.num_params:,}", self.cfg.data.name, dist.size,
                 self.cfg.trainer.batch_size, model.summary())
        if not self.tracker.enabled:
            return
        tags = {"dpcnn.version": __version__, "dpcnn.world_size": str(dist.size),
                "dpcnn.mpi": Dist.library_version(), "dpcnn.run_dir": str(self.run_dir),
                "dpcnn.model": self.cfg.model.name, "dpcnn.data": self.cfg.data.name}
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if resumed_from:
            tags["dpcnn.resumed_from"] = resumed_from.get("mlflow_run_id") or resumed_from["path"]
            tags["dpcnn.resumed_at_step"] = str(resumed_from["step"])
        name = self.cfg.tracking.get("run_name") or f"{self.cfg.model.name}-{self.cfg.data.name}-{dist.size}r"
        self.tracker.start(run_name=name, tags=tags)
        container = OmegaConf.to_container(self.cfg, resolve=True)
        self.tracker.log_params({**flatten(container), "world_size": dist.size, "num_params": model.num_params})
        self.tracker.log_text(OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
        if resumed_from and resumed_from.get("mlflow_run_id"):
            # The run the checkpoint came from was cut short (killed or pre-empted).
            mark_run(self.cfg.tracking.get("uri"), resumed_from["mlflow_run_id"], "FAILED",
                     {"dpcnn.resumed_by": self.tracker.run_id})
        if data is not None and self.cfg.tracking.get("datasets", True):
            self._log_datasets(data)
        if self.cfg.tracking.get("system_metrics", False):
            self.tracker.start_system_metrics(float(self.cfg.tracking.get("system_metrics_interval", 10)))

    def _log_datasets(self, data) -> None:
        """train/val/test as the run's MLflow dataset inputs: name, digest, source folder, context."""
        from .data import find_files

        try:
            found, _ = find_files(data.spec, self.cfg.data.get("root"))
            source = str(found["train_images"].resolve().parent) if "train_images" in found else None
            splits = [("train", data.train, "training"), ("val", data.val, "validation"),
                      ("test", data.test, "testing")]
            self.tracker.log_inputs([dataset_input(f"{data.spec.name}-{part}", x, y, source, context)
                                     for part, xy, context in splits if xy is not None for x, y in [xy]])
        except Exception as e:  # noqa: BLE001 - a record of the data is not worth a failed run
            log.warning("could not log the datasets to MLflow: %s: %s", type(e).__name__, e)

    def _model_spec(self, model: Model) -> dict:
        from .serving import model_spec

        spec, normalize = self.data.spec, bool(self.cfg.data.get("normalize", True))
        return model_spec(OmegaConf.to_container(self.cfg.model.layers, resolve=True), model.input_shape,
                          spec.num_classes, mean=spec.mean if normalize else 0.0, std=spec.std if normalize else 1.0,
                          dataset=spec.name, dtype=str(model.dtype), num_params=model.num_params)

    def _log_results(self, model: Model) -> None:
        """Rank 0, end of a finished run: test-set plots, per-class table, and the servable model."""
        tcfg, (x, y) = self.cfg.tracking, self.data.test
        spec, t0 = self._model_spec(model), time.perf_counter()
        if tcfg.get("plots", True):
            try:
                from . import viz

                report = viz.render_report(
                    model, x, y, self.run_dir / "plots", history=self.history, mean=spec["mean"], std=spec["std"],
                    class_names=spec["class_names"], activation_images=int(tcfg.get("activation_images", 4)),
                    probs=model.predict_proba(x, batch_size=self.cfg.trainer.eval_batch_size))
                self.tracker.log_artifacts(self.run_dir / "plots", "plots")
                self.tracker.log_table(report["table"], "per_class_metrics.json")
                log.info("plots of the test set drawn in %s (%.1f s)", self.run_dir / "plots",
                         time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - pictures are not worth failing a finished run
                log.warning("drawing the plots failed (%s: %s); the run is otherwise complete", type(e).__name__, e)
        if tcfg.get("log_model", True):
            from .serving import log_pyfunc

            params = model.params.copy()
            example = np.clip(x[:2] * np.float32(spec["std"]) + np.float32(spec["mean"]), 0, 1).astype(np.float32)
            step = int(self.history[-1].get("step", 0)) if self.history else 0
            tracker, register_as = self.tracker, tcfg.get("register_as") or None
            self.tracker.call(lambda: log_pyfunc(tracker.run_id, tracker.experiment_id, params, spec, example,
                                                 registered_model_name=register_as, step=step,
                                                 tracking_uri=tracker.uri), "log_model")

    @property
    def run_id(self):
        return self.tracker.run_id

    def epoch_bar(self, epoch: int, total: int, start: int) -> None:
        if self.enabled and self.cfg.trainer.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{self.cfg.trainer.epochs}",
                            unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, loss: float, acc: float, img_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.1%}", img_s=f"{img_s:,.0f}", refresh=False)
        if step % self.cfg.trainer.log_every == 0:
            self.tracker.log_metrics({"train_loss_step": loss}, step)

    def epoch(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        log.info("epoch %d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%%%s | %s img/s | "
                 "allreduce %.1f%% of step", metrics["epoch"], metrics["train_loss"], 100 * metrics["train_acc"],
                 metrics["test_loss"], 100 * metrics["test_acc"],
                 f" | val acc {100 * metrics['val_acc']:.2f}%" if "val_acc" in metrics else "",
                 f"{metrics['img_per_s']:,.0f}", 100 * metrics["allreduce_frac"])
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)

    def save(self, model: Model, opt_state: dict, pos: Position) -> str | None:
        """Write the checkpoint; returns an error message instead of raising (the caller shares it)."""
        if not (self.enabled and self.cfg.trainer.checkpoint):
            return None
        meta = {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "history": pos.history,
                "config": OmegaConf.to_yaml(self.cfg, resolve=True), "mlflow_run_id": self.run_id,
                "dpcnn_version": __version__, "num_params": model.num_params, "dtype": str(model.dtype)}
        try:
            checkpoint.save(self.ckpt_dir, checkpoint.Checkpoint(model.params, opt_state, meta),
                            keep_last=self.cfg.trainer.keep_last)
        except DpcnnError as e:
            return str(e)
        return None

    def finish(self, status: str, model: Model | None = None, summary: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if summary:
            self.tracker.set_tags({f"dpcnn.final.{k}": f"{v:.6g}" for k, v in summary.items()})
        # Plots and the model only for a finished run: a KILLED job (a signal) should exit
        # promptly and is resumed from its checkpoint; a FAILED one has nothing to show.
        if status == "FINISHED" and model is not None and self.tracker.enabled and getattr(self, "data", None):
            self._log_results(model)
        if self.tracker.enabled and self.ckpt_dir.joinpath(checkpoint.LAST).exists():
            self.tracker.log_artifact(self.ckpt_dir / checkpoint.LAST, "checkpoints")
        # An unreachable server is waited for (tracking.flush_timeout), unless a signal says stop.
        self.tracker.end(status, interrupted=lambda: bool(_signal_received))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


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


# --------------------------------------------------------------------- training

def micro_slices(start: int, length: int, micro: int) -> list[slice]:
    """A shard's micro-batches, as slices of the shard. The shard is global positions
    [start, start + length) of its batch; it is cut at the multiples of ``micro``, so where
    shards are whole micro-batches every world size computes the very same micro-batches.
    Summed and reduced in float64 (nearly exact, so the order of the additions no longer
    matters), they make the trajectory the same at every world size (README)."""
    cuts = [start, *range((start // micro + 1) * micro, start + length, micro), start + length]
    return [slice(a - start, b - start) for a, b in zip(cuts, cuts[1:]) if b > a]


def train(cfg: DictConfig, dist: Dist) -> float:
    """Train as configured; returns the objective (validation accuracy if there is a split, else test)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    t = cfg.trainer
    dist.pin_blas_threads()
    dtype = np.dtype(t.dtype) if t.dtype in ("float32", "float64") else None

    # Setup. Every rank validates and builds the same things; an error anywhere stops all ranks.
    dist.agree(lambda: validate(cfg, dist.size))
    model = dist.agree(lambda: Model.from_config(OmegaConf.to_container(cfg.model.layers, resolve=True),
                                                  num_classes=cfg.data.num_classes, seed=cfg.seed, dtype=dtype,
                                                  init=cfg.model.get("init", "fan_in_uniform")))
    data = load_on_all_ranks(cfg, dist)
    x_train, y_train = data.train
    if model.input_shape != x_train.shape[1:]:
        raise ConfigError(f"model input {model.input_shape} does not match the data's {x_train.shape[1:]}")
    sampler = EpochSampler(len(x_train), t.batch_size, seed=cfg.seed, drop_last=t.drop_last)
    # The LR schedule spans trainer.epochs; max_steps is a budget that stops early
    # without reshaping the schedule (so a run stopped and resumed matches one that was not).
    lr_at = dist.agree(lambda: make_schedule(cfg.optimizer, sampler.num_batches, t.epochs * sampler.num_batches))
    last_step = min(t.epochs * sampler.num_batches, t.max_steps or math.inf)
    opt = dist.agree(lambda: make_optimizer(model.params, cfg.optimizer))

    # The step buffer: the gradients, then the LOSS, CORRECT, STOP and ERROR slots. With
    # micro-batches it is float64 and sums the micro-batches' gradients (see micro_slices).
    n, micro = model.num_params, t.get("micro_batch")
    buf = np.zeros(n + 4, np.float64 if micro else model.dtype)
    grad = np.zeros(n, model.dtype) if micro else buf[:n]  # the optimizer's (reduced) gradient
    model.bind_grads(grad)
    pos, resumed_from = Position(), None
    if t.resume:
        pos, resumed_from = resume(cfg, dist, model, opt, run_dir)
    dist.broadcast_(model.params)  # the ranks start identical whatever their seeds
    for arr in opt.state().values():
        dist.broadcast_(arr)

    fault = _fault_injection(dist.rank)
    out = RootOutputs(cfg, dist, run_dir)
    dist.agree(lambda: out.start(model, dist, resumed_from, data, pos.history))
    augment = cfg.data.get("augment") or {}

    def shard_gradient(k: int, gsize: int, idx: np.ndarray) -> None:
        """This rank's part of step k: gradient of (its loss sum / global batch) into buf."""
        try:
            if fault and fault[0] == pos.step:
                _inject(fault[1], dist.rank, pos.step)
            x, y = x_train[idx], y_train[idx]
            if augment.get("enabled"):
                shifts = shift_offsets(cfg.seed, pos.epoch, k, gsize, int(augment.get("max_shift", 2)))
                x = random_shift(x, EpochSampler.shard(shifts, dist.rank, dist.size), data.background)
            if not micro:
                buf[n + LOSS], buf[n + CORRECT] = model.loss_and_grads(x, y, denom=gsize)
                return
            buf[:n] = 0
            for part in micro_slices(EpochSampler.shard_start(gsize, dist.rank, dist.size), len(idx), micro):
                loss, correct = model.loss_and_grads(x[part], y[part], denom=gsize)
                buf[:n] += grad
                buf[n + LOSS] += loss
                buf[n + CORRECT] += correct
        except Exception:  # noqa: BLE001 - reported here, then every rank stops together
            print(f"dpcnn: rank {dist.rank} failed at step {pos.step}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            buf[n + ERROR] = 1

    status, summary, stop = "FAILED", {}, False
    started = time.perf_counter() - (pos.history[-1].get("elapsed_s", 0.0) if pos.history else 0.0)
    try:
        while pos.epoch < t.epochs and pos.step < last_step:
            out.epoch_bar(pos.epoch, sampler.num_batches, pos.batch)
            stats = EpochStats()
            for k, gsize, idx in sampler.local_batches(pos.epoch, dist.rank, dist.size, start=pos.batch):
                t0 = time.perf_counter()
                buf[n:] = 0
                shard_gradient(k, gsize, idx)
                buf[n + STOP] = bool(_signal_received)
                t1 = time.perf_counter()
                dist.allreduce_sum_(buf)  # the step's one collective: mean gradient + metrics + flags
                t2 = time.perf_counter()
                if buf[n + ERROR]:
                    raise DpcnnError(f"a rank failed at step {pos.step} (see its error above); the last "
                                     f"checkpoint is intact, resume with trainer.resume=auto hydra.run.dir={run_dir}")
                step_loss, step_correct = float(buf[n + LOSS]), int(buf[n + CORRECT])
                if micro:
                    grad[...] = buf[:n]
                if not (math.isfinite(step_loss) and np.isfinite(grad.sum())):
                    raise Diverged(f"training diverged at step {pos.step}, epoch {pos.epoch + 1}: loss is "
                                   f"{step_loss}; lower optimizer.lr (now {cfg.optimizer.lr}), e.g. "
                                   f"optimizer.lr={cfg.optimizer.lr / 10:g}")
                opt.step(grad, lr_at(pos.step))
                pos.step, pos.batch = pos.step + 1, k + 1
                stop = stop or bool(buf[n + STOP])  # a signal on any rank stops all of them here
                stats.add(gsize, step_loss, step_correct, time.perf_counter() - t0, t2 - t1)
                out.step(pos.step, step_loss, step_correct / gsize, stats.img_per_s)
                if stop or pos.step >= last_step:
                    break
                if t.get("checkpoint_every") and pos.step % t.checkpoint_every == 0:
                    save_or_raise(out, model, opt, pos, dist)
            if pos.batch == sampler.num_batches:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            if stats.seen:
                metrics = {"epoch": pos.epoch if pos.batch == 0 else pos.epoch + 1, "step": pos.step,
                           **stats.metrics(),
                           **evaluate_splits(model, data, dist, t.eval_batch_size),
                           "elapsed_s": time.perf_counter() - started,  # wall time of training so far
                           "peak_rss_mb": max(dist.allgather(_peak_rss_mb()))}  # the largest rank
                pos.history.append(metrics)
                out.epoch(metrics, pos.step)
                summary = {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss"))}
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


def save_or_raise(out: RootOutputs, model: Model, opt, pos: Position, dist: Dist) -> None:
    """Rank 0 writes the checkpoint; a failure there stops every rank with its message."""
    error = dist.bcast(out.save(model, opt.state(), pos))
    if error:
        raise DpcnnError(error)


def check_in_sync(model: Model, dist: Dist) -> None:
    """Ranks must hold bitwise-identical parameters; verify with one small allgather."""
    digests = dist.allgather(hashlib.blake2b(model.params.tobytes(), digest_size=16).hexdigest())
    if len(set(digests)) != 1:
        raise DpcnnError("ranks' parameters differ (non-deterministic reduction?); please report this with "
                         "your MPI library and world size")


def resume(cfg, dist, model, opt, run_dir: Path) -> tuple[Position, dict]:
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


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fault_injection(rank: int) -> tuple[int, str] | None:
    """DPCNN_FAULT="rank=R,step=S[,action=raise|stall]": what rank R does at step S (for failure tests).

    ``raise`` (the default) fails the step; ``stall`` holds the rank there until a signal arrives,
    so a test can signal or kill a job at a known step instead of racing a fast run.
    """
    spec = os.environ.get("DPCNN_FAULT")
    if not spec:
        return None
    kv = dict(part.split("=") for part in spec.split(","))
    if kv.get("action", "raise") not in ("raise", "stall"):
        raise DpcnnError(f"DPCNN_FAULT={spec!r}: action must be raise or stall")
    return (int(kv["step"]), kv.get("action", "raise")) if int(kv.get("rank", 0)) == rank else None


def _inject(action: str, rank: int, step: int, stall_limit_s: float = 600.0) -> None:
    if action == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    end = time.monotonic() + stall_limit_s
    while not _signal_received and time.monotonic() < end:
        time.sleep(0.01)


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
