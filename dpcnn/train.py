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
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import config, faults, host_metrics, sweep
from .data import Augment, EpochSampler, fit_config, get_spec, head_for, input_hint, load_data, prepare
from .dist import Dist
from .early_stop import EpochStopper
from .errors import EXIT_FAILED, EXIT_SIGNAL, EXIT_USAGE, ConfigError, Diverged, DpcnnError, report
from .evaluate import EpochStats, end_epoch
from .host_metrics import HostMetrics
from .model import Model
from .optim import make_optimizer, make_schedule
from .outputs import RootOutputs
from .resume import Position, check_in_sync, resume, save_or_raise
from .rundir import RunDirLock
from .step import StepBuffer, shard_start

log = logging.getLogger("dpcnn")


def _conf_dir() -> str:
    """conf/ inside the installed package (wheel), else the checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"dpcnn's Hydra configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


#: Set by SIGTERM/SIGINT on any rank; acted on at the next step boundary by all ranks together.
_signal_received: list[int] = []


def _on_signal(signum, frame):  # noqa: ARG001
    _signal_received.append(signum)


def stop_requested() -> bool:
    """A SIGTERM/SIGINT arrived on this rank."""
    return bool(_signal_received)


# ----------------------------------------------------------------------------- setup

def validate(cfg: DictConfig, world_size: int) -> None:
    """Checks that need no data and no compute: fail in seconds. The model's layers are checked here too
    when the config alone fixes the input (registered datasets, image folders), else once the data is read."""
    config.validate(cfg, world_size)
    spec = get_spec(cfg.data)  # unknown dataset name
    shape = input_hint(cfg.data)
    if shape is not None:
        make_model(cfg, shape, cfg.data.num_classes or spec.num_classes)


def make_model(cfg: DictConfig, input_shape, num_classes: int) -> Model:
    """``cfg.model`` for this input and this many classes (the last dense layer's width follows them)."""
    layers = OmegaConf.to_container(cfg.model.layers, resolve=True)
    head_for(layers, num_classes)
    return Model.from_config(layers, input_shape=input_shape, num_classes=num_classes, seed=cfg.seed,
                             dtype=np.dtype(cfg.trainer.dtype), init=cfg.model.init)


def load_on_all_ranks(cfg: DictConfig, dist: Dist):
    """Rank 0 finds or downloads the files (or decodes an image folder) and identifies them while the others
    wait (`dpcnn.data.prepare`: the wrong dataset is an error on every rank); then all ranks read them."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)

    def fetch():
        faults.check("setup", dist.rank, 0, stop_requested)
        return prepare({**data_cfg, "progress": bool(cfg.trainer.progress)}) if dist.is_root else None

    identity = dist.bcast(dist.agree(fetch))
    return dist.agree(lambda: load_data({**data_cfg, "download": False}, identity=identity))


# --------------------------------------------------------------------- training

def train(cfg: DictConfig, dist: Dist) -> float:
    """Train as configured; returns the objective (validation accuracy if there is a split, else test)."""
    run_dir, t = Path(HydraConfig.get().runtime.output_dir), cfg.trainer
    dist.pin_blas_threads()
    # Setup. Every rank validates and builds the same things; an error anywhere stops all ranks.
    dist.agree(lambda: validate(cfg, dist.size))
    dist.watchdog.configure(t.stall_warning, t.collective_timeout, t.setup_timeout)
    with owned_by_this_job(run_dir, dist):
        model, data, sampler, opt, lr_at, last_step = build(cfg, dist)
        step = StepBuffer(model, t.micro_batch, dist, t.overlap, t.bucket_bytes, t.grad_compression,
                          step_batches=sampler.batch_sizes)
        pos, resumed_from = resume(cfg, dist, model, opt, run_dir, step)  # rank 0's weights (or checkpoint) everywhere
        stopper = EpochStopper(cfg, pos.history, model, dist, run_dir / "checkpoints")  # [early stop]
        if pos.step >= last_step or stopper.reason:  # [early stop] a run that stopped early trains nothing more
            return nothing_to_train(pos, last_step, cfg, dist, stopper)
        out = RootOutputs(cfg, dist, run_dir, interrupted=stop_requested)
        run_id = dist.from_root(lambda: out.start(model, dist, resumed_from, data, pos.history))
        HostMetrics(cfg.tracking, dist, run_id)  # system metrics of the other hosts, into that run (to the end)
        dist.watchdog.advice, dist.watchdog.on_timeout = lambda: resume_advice(pos, cfg, run_dir), out.timed_out
        batch_of = Batches(cfg, data, dist)
        status, summary, stop = "FAILED", {}, False
        started = time.perf_counter() - (pos.history[-1].get("elapsed_s", 0.0) if pos.history else 0.0)
        try:
            while pos.epoch < t.epochs and pos.step < last_step and not stopper.reason:  # [early stop]
                out.epoch_bar(pos.epoch, sampler.num_batches, pos.batch)
                stats = EpochStats(clock=step.clock)
                for k, gsize, idx in sampler.local_batches(pos.epoch, dist.rank, dist.size, start=pos.batch):
                    dist.watchdog.step = pos.step
                    with reported_as_step_error(step, dist.rank, pos.step):
                        faults.check("step", dist.rank, pos.step, stop_requested)
                        step.shard_gradient(*batch_of(pos.epoch, k, gsize, idx), gsize, shard_start(gsize, dist),
                                            pos.step)
                    step.request_stop(stop_requested())
                    step.reduce(dist)  # the step's one reduction (buckets start in backward): gradient, metrics, flags
                    raise_if_failed(step, pos, cfg, run_dir)
                    opt.step(step.grad, lr_at(pos.step))
                    pos.step, pos.batch = pos.step + 1, k + 1
                    stop = stop or step.stop  # a signal on any rank stops all of them here
                    stats.add(gsize, step.loss, step.correct, *step.clock.end())
                    out.step(pos.step, step.loss, step.correct / gsize, stats.img_per_s)
                    if stop or pos.step >= last_step:
                        break
                    if t.checkpoint_every and pos.step % t.checkpoint_every == 0:
                        save_or_raise(out, model, opt, pos, dist, step)
                if pos.batch == sampler.num_batches:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                if stats.seen:
                    summary = end_epoch(model, data, dist, out, pos, stats, started, t.eval_batch_size)
                    stopper.after_epoch(pos, summary, model, out)  # [early stop] the same verdict on every rank
                check_in_sync(model, dist)
                save_or_raise(out, model, opt, pos, dist, step)
                if stop:
                    status = "KILLED"
                    stopped_by_signal(pos, cfg, run_dir)
            status, summary = stopper.finish(model, summary)  # [early stop] the best epoch's weights and figures
        finally:
            out.finish(status, model, summary)
    return objective(summary, cfg)


def objective(summary: dict, cfg: DictConfig) -> float:
    """What a run (or a sweep trial) returns: the metric `config.objective_name` names."""
    return float(summary.get(config.objective_name(cfg), float("nan")))


def stopped_by_signal(pos: Position, cfg: DictConfig, run_dir: Path) -> None:
    """All ranks agreed to stop (SIGTERM/SIGINT): say how to resume, exit 143."""
    log.warning("stopped by signal at step %d; %s", pos.step, resume_advice(pos, cfg, run_dir))
    raise SystemExit(EXIT_SIGNAL)


def nothing_to_train(pos: Position, last_step: int, cfg: DictConfig, dist: Dist, stopper: EpochStopper) -> float:
    """A resume of a run whose budget is spent, or that stopped early: no new MLflow run; the recorded objective."""
    if dist.is_root and stopper.reason:
        log.warning("nothing to train: the run stopped early at epoch %d (%s)", pos.history[-1]["epoch"],
                    stopper.reason)
    elif dist.is_root:
        log.warning("nothing to train: the checkpoint is at step %d of %d; raise trainer.epochs or "
                    "trainer.max_steps to train further", pos.step, last_step)
    return objective(stopper.figures(pos.history[-1] if pos.history else {}), cfg)


@contextlib.contextmanager
def owned_by_this_job(run_dir: Path, dist: Dist):
    """Rank 0 holds the run directory's lock (dpcnn.rundir) for the whole run; a second job stops."""
    lock = RunDirLock(run_dir)
    dist.agree(lambda: dist.is_root and lock.acquire())
    try:
        yield
    finally:
        lock.release()


def build(cfg: DictConfig, dist: Dist):
    """The model, the data, the sampler, the optimizer, the LR schedule and the last step, on every rank."""
    t = cfg.trainer
    data = load_on_all_ranks(cfg, dist)
    # The data decides the model's input shape, the number of classes and their names (written into cfg, so
    # checkpoints, MLflow and the served model's spec say so); then every rank builds the same model.
    dist.agree(lambda: fit_config(cfg, data, announce=dist.is_root))
    model = dist.agree(lambda: make_model(cfg, data.input_shape, data.num_classes))
    sampler = EpochSampler(len(data.train[0]), t.batch_size, seed=cfg.seed, drop_last=t.drop_last)
    check_budget(cfg, data, sampler, dist)
    lr_at = dist.agree(lambda: make_schedule(cfg.optimizer, sampler.num_batches, t.epochs * sampler.num_batches))
    opt = dist.agree(lambda: make_optimizer(model.trainable, cfg.optimizer))
    # The LR schedule spans trainer.epochs; max_steps is a budget that stops early
    # without reshaping the schedule (so a run stopped and resumed matches one that was not).
    return model, data, sampler, opt, lr_at, min(t.epochs * sampler.num_batches, t.max_steps or math.inf)


def check_budget(cfg: DictConfig, data, sampler: EpochSampler, dist: Dist) -> None:
    """A run that would train nothing is an error; a batch or subset larger than the data, a warning."""
    n, t, subset = sampler.n, cfg.trainer, cfg.data.train_subset
    if sampler.num_batches == 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} with trainer.drop_last=true leaves no whole batch of "
                          f"the {n:,} training examples: nothing would train; use trainer.batch_size<={n} or "
                          "trainer.drop_last=false")
    if not dist.is_root:
        return
    available = n + (len(data.val[0]) if data.val is not None else 0)
    if subset is not None and subset > available:
        log.warning("data.train_subset=%d is more than the %s training examples there are: using all %s",
                    subset, f"{available:,}", f"{available:,}")
    if t.batch_size > n:
        log.warning("trainer.batch_size=%d is more than the %s training examples: each epoch is one batch of %s",
                    t.batch_size, f"{n:,}", f"{n:,}")


def resume_advice(pos: Position, cfg: DictConfig, run_dir: Path) -> str:
    """What to do next, true to what is on disk: a checkpoint to resume from, or none."""
    resume_with = f"trainer.resume=auto hydra.run.dir={run_dir}"
    if pos.saved_step is not None and pos.saved_step == pos.step:
        return f"checkpoint written (step {pos.step}); resume with {resume_with}"
    if pos.saved_step is not None:
        return f"the checkpoint of step {pos.saved_step} is intact; resume with {resume_with}"
    if not cfg.trainer.checkpoint:
        return "no checkpoint was written (trainer.checkpoint=false): a new run starts from step 0"
    return "no checkpoint was written yet: a new run starts from step 0"


class Batches:
    """``batches(epoch, k, global_size, idx)``: this rank's (x, y) of global batch k, augmented if configured."""

    def __init__(self, cfg: DictConfig, data, dist: Dist):
        self.x, self.y = data.train
        # Shifts and flips are drawn for the whole global batch, then sharded: the same at every world size.
        self.augment = Augment(cfg.data.augment, cfg.seed, data.background, dist.rank, dist.size)

    def __call__(self, epoch: int, k: int, global_size: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.x[idx], self.y[idx]
        return (self.augment(x, epoch, k, global_size) if self.augment.active else x), y


@contextlib.contextmanager
def reported_as_step_error(step: StepBuffer, rank: int, at: int):
    """Clear the step's slots; an exception inside is printed and flagged in the ERROR slot, so every
    rank learns of it at the step's reduction and all stop together instead of hanging."""
    step.clear_slots()
    try:
        yield
    except Exception:  # noqa: BLE001 - reported here, then every rank stops together
        step.fail(rank, at)


def raise_if_failed(step: StepBuffer, pos: Position, cfg: DictConfig, run_dir: Path) -> None:
    """After the reduction: a failed rank, or a loss/gradient that is no longer finite, stops every rank."""
    lr = cfg.optimizer.lr
    if step.error:
        raise DpcnnError(f"a rank failed at step {pos.step} (see its error above); "
                         f"{resume_advice(pos, cfg, run_dir)}")
    if not (math.isfinite(step.loss) and np.isfinite(step.grad.sum())):
        raise Diverged(f"training diverged at step {pos.step}, epoch {pos.epoch + 1}: loss is "
                       f"{step.loss}; lower optimizer.lr (now {lr}), e.g. optimizer.lr={lr / 10:g}")


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
        report(str(e))
        if not multirun:
            sys.exit(e.exit_code)
        sweep.note_failure(e)
        objective = float("nan")  # this trial failed (FAILED in MLflow and Optuna); the sweep goes on
    except SystemExit as e:
        if e.code == EXIT_SIGNAL:  # an agreed stop: every rank is here while rank 0 ends the run as KILLED
            dist.wait_all()
        raise
    except BaseException:  # noqa: BLE001 - a bug or an error on this rank only: no rank may hang
        traceback.print_exc()
        print(f"dpcnn: rank {dist.rank} crashed; aborting all ranks", file=sys.stderr, flush=True)
        dist.abort(1)
    # Rank 0 may still be ending the run (plots, the model, a tracking flush): the others wait here with
    # their signal handlers in place, so a SIGTERM now cannot kill a finished rank and tear rank 0 down.
    dist.wait_all()
    host_metrics.finish_all()
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
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    if full_error is None:
        logging.captureWarnings(True)
    _share_run_stamp()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its composition errors to us instead of printing them
    try:
        _hydra_entry()
        if sweep.TRIAL.infra_failed:  # a sweep some of whose trials the tracking store failed: exit 1, every rank
            sys.exit(EXIT_FAILED)
    except (HydraException, OmegaConfBaseException, DpcnnError) as e:
        if full_error:
            raise
        # A key that does not exist, a value of the wrong type, a missing group option, a sweep
        # error: Hydra's message (with its suggestion) as one line, the same on every rank.
        report(config.one_line(e))
        sys.exit(getattr(e, "exit_code", EXIT_USAGE))


if __name__ == "__main__":
    main()
