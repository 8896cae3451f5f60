"""Every side effect that only rank 0 performs: MLflow, checkpoints, the progress bar, the epoch line.

`RootOutputs` is built on every rank; on the others each method is a no-op, so
the training loop has no ``if rank == 0`` in it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from . import __version__, checkpoint, faults, timeline, viz
from .dist import Dist
from .errors import DpcnnError
from .host_metrics import name_this_host
from .model import Model
from .resume import Position
from .tracking import dataset_input, flatten, make_tracker, mark_run

log = logging.getLogger("dpcnn")


class RootOutputs:
    """Every side effect that only rank 0 performs: MLflow, checkpoints, progress.

    Built on every rank; on the others each method is a no-op, so the training
    loop has no ``if rank == 0`` in it.
    """

    def __init__(self, cfg: DictConfig, dist: Dist, run_dir: Path, interrupted: Callable[[], bool] = lambda: False):
        """``interrupted()`` says whether a stop signal arrived (then the end does not wait for a server)."""
        self.enabled, self.cfg, self.run_dir, self.interrupted = dist.is_root, cfg, run_dir, interrupted
        self.tracker = make_tracker(cfg.tracking, run_dir, dist.is_root)
        self.ckpt_dir = run_dir / "checkpoints"
        self.bar = None

    def start(self, model: Model, dist: Dist, resumed_from: dict | None, data=None,
              history: list | None = None) -> str | None:
        """Start the MLflow run (rank 0); returns its id (None without tracking).

        ``data`` (the `dpcnn.data.Splits`) is logged as the run's dataset inputs and, at the end,
        its test split feeds the confusion matrix, activation maps and misclassified examples.
        ``history`` is the training loop's list of per-epoch metrics (resumed ones included),
        which the learning curves draw."""
        if not self.enabled:
            return None
        self.data, self.history = data, history if history is not None else []
        log.info("model %s (%s parameters), data %s, %d rank(s), global batch %d\n%s",
                 self.cfg.model.name, f"{model.num_params:,}", self.cfg.data.name, dist.size,
                 self.cfg.trainer.batch_size, model.summary())
        if not self.tracker.enabled:
            return None
        tags = {"dpcnn.version": __version__, "dpcnn.world_size": str(dist.size),
                "dpcnn.mpi": Dist.library_version(), "dpcnn.run_dir": str(self.run_dir),
                "dpcnn.model": self.cfg.model.name, "dpcnn.data": self.cfg.data.name}
        if os.environ.get("DPCNN_RESTARTS", "0") != "0":  # set by launch/local.sh --max-restarts
            tags["dpcnn.restarts"] = os.environ["DPCNN_RESTARTS"]
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if data is not None and data.identity is not None:  # which bytes this run trains on (dpcnn.identify)
            tags.update(data.identity.tags())
        if resumed_from:
            tags["dpcnn.resumed_from"] = resumed_from.get("mlflow_run_id") or resumed_from["path"]
            tags["dpcnn.resumed_at_step"] = str(resumed_from["step"])
        name = self.cfg.tracking.run_name or f"{self.cfg.model.name}-{self.cfg.data.name}-{dist.size}r"
        self.tracker.start(run_name=name, tags=tags)
        container = OmegaConf.to_container(self.cfg, resolve=True)
        self.tracker.log_params({**flatten(container), "world_size": dist.size, "num_params": model.num_params})
        self.tracker.log_text(OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
        if resumed_from and resumed_from.get("mlflow_run_id"):
            # The run the checkpoint came from was cut short (killed or pre-empted).
            mark_run(self.cfg.tracking.uri, resumed_from["mlflow_run_id"], "FAILED",
                     {"dpcnn.resumed_by": self.tracker.run_id})
        if data is not None and self.cfg.tracking.datasets:
            self._log_datasets(data)
        if self.cfg.tracking.system_metrics:
            name_this_host(dist)  # a job on several hosts tells their samplers apart (dpcnn.host_metrics)
            self.tracker.start_system_metrics(self.cfg.tracking.system_metrics_interval)
        return self.tracker.run_id

    def _log_datasets(self, data) -> None:
        """train/val/test as the run's MLflow dataset inputs: name, digest, source folder, context."""
        try:
            source = data.source
            splits = [("train", data.train, "training"), ("val", data.val, "validation"),
                      ("test", data.test, "testing")]
            self.tracker.log_inputs([dataset_input(f"{data.spec.name}-{part}", x, y, source, context)
                                     for part, xy, context in splits if xy is not None for x, y in [xy]])
        except Exception as e:  # noqa: BLE001 - a record of the data is not worth a failed run
            log.warning("could not log the datasets to MLflow: %s: %s", type(e).__name__, e)

    def _model_spec(self, model: Model) -> dict:
        from .serving import (
            spec_from_config,  # imports mlflow.pyfunc: only rank 0, only at the end
        )

        spec = spec_from_config(OmegaConf.to_container(self.cfg, resolve=True), num_params=model.num_params)
        if tuple(spec["input_shape"]) != tuple(model.input_shape):
            raise DpcnnError(f"model input {model.input_shape} differs from the config's {spec['input_shape']}")
        return spec

    def _log_results(self, model: Model) -> None:
        """Rank 0, end of a finished run: test-set plots, per-class table, and the servable model."""
        tcfg, (x, y) = self.cfg.tracking, self.data.test
        spec, t0 = self._model_spec(model), time.perf_counter()
        if tcfg.plots:
            try:
                report = viz.render_report(
                    model, x, y, self.run_dir / "plots", history=self.history, mean=spec["mean"], std=spec["std"],
                    class_names=spec["class_names"], activation_images=tcfg.activation_images,
                    probs=model.predict_proba(x, batch_size=self.cfg.trainer.eval_batch_size))
                self.tracker.log_artifacts(self.run_dir / "plots", "plots")
                self.tracker.log_table(report["table"], "per_class_metrics.json")
                log.info("plots of the test set drawn in %s (%.1f s)", self.run_dir / "plots",
                         time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - pictures are not worth failing a finished run
                log.warning("drawing the plots failed (%s: %s); the run is otherwise complete", type(e).__name__, e)
        if tcfg.log_model:
            example = np.clip(x[:2] * np.float32(spec["std"]) + np.float32(spec["mean"]), 0, 1).astype(np.float32)
            step = int(self.history[-1].get("step", 0)) if self.history else 0
            # Journaled like every record (its files in the run directory) and logged once, even across retries.
            self.tracker.log_model(model.params.copy(), spec, example, step=step,
                                   registered_model_name=tcfg.register_as or None)

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
        # Two speeds: the steps alone, and the epoch's wall clock (evaluation, checkpoints, anything that
        # stalled rank 0 included), so a stall anywhere shows up.
        split = (f" (waiting {metrics['comm_wait_frac']:.1%} + transfer {metrics['comm_transfer_frac']:.1%})"
                 if "comm_wait_frac" in metrics else "")
        log.info("epoch %d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%%%s | %s img/s in steps, %s img/s "
                 "wall (%.1f s) | allreduce %.1f%% of step%s", metrics["epoch"], metrics["train_loss"],
                 100 * metrics["train_acc"], metrics["test_loss"], 100 * metrics["test_acc"],
                 f" | val acc {100 * metrics['val_acc']:.2f}%" if "val_acc" in metrics else "",
                 f"{metrics['img_per_s']:,.0f}", f"{metrics['wall_img_per_s']:,.0f}", metrics["epoch_time_s"],
                 100 * metrics["allreduce_frac"], split)
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)

    def timeline(self, rows: np.ndarray | None, hosts: list[str], pos: Position) -> None:
        """``trainer.profile``: add this epoch's rows ``(ranks, steps, columns)`` to the run's Chrome
        trace, draw its bars, log both under ``timeline/`` (`dpcnn.timeline`)."""
        if not self.enabled or rows is None or not rows.shape[1]:
            return
        if not hasattr(self, "_trace"):
            self._trace, self._t0 = [], float(rows[0, 0, timeline.START])
        first = pos.step - rows.shape[1]
        self._trace += timeline.trace_events(rows, hosts, first, self._t0)
        try:
            paths = timeline.write(self.run_dir / "timeline", self._trace, rows, hosts, pos.epoch + (pos.batch > 0))
        except Exception as e:  # noqa: BLE001 - a profile is not worth a failed run
            log.warning("writing the timeline failed (%s: %s)", type(e).__name__, e)
            return
        for path in paths:
            self.tracker.log_artifact(path, "timeline")

    def save(self, model: Model, opt_state: dict, pos: Position,
             name: str = checkpoint.LAST) -> tuple[str | None, bool]:
        """Write the checkpoint (``name``: last.npz and step files, or e.g. best.npz alone); returns (error
        message or None, whether one was written) instead of raising (the caller shares it with every rank)."""
        if not (self.enabled and self.cfg.trainer.checkpoint):
            return None, False
        meta = {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "history": pos.history,
                "config": OmegaConf.to_yaml(self.cfg, resolve=True), "mlflow_run_id": self.run_id,
                "dpcnn_version": __version__, "num_params": model.num_params, "dtype": str(model.dtype)}
        try:
            checkpoint.save(self.ckpt_dir, checkpoint.Checkpoint(model.params, opt_state, meta),
                            keep_last=self.cfg.trainer.keep_last, name=name)
        except DpcnnError as e:
            return str(e), False
        return None, True

    def timed_out(self) -> None:
        """From the watchdog's thread, just before the job is aborted: the run ends FAILED, saying why."""
        if self.enabled and self.tracker.enabled and self.run_id:
            self.tracker.set_tags({"dpcnn.failure": "collective timeout"})
            self.tracker.end("FAILED", wait=min(5.0, self.cfg.tracking.flush_timeout))  # then the journal

    def finish(self, status: str, model: Model | None = None, summary: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        try:
            if summary:
                self.tracker.set_tags({f"dpcnn.final.{k}": f"{v:.6g}" for k, v in summary.items()})
            # Plots and the model only for a finished run: a KILLED job (a signal) should exit
            # promptly and is resumed from its checkpoint; a FAILED one has nothing to show.
            faults.check("end", 0, self.history[-1]["step"] if self.history else 0, self.interrupted)
            if status == "FINISHED" and model is not None and self.tracker.enabled and getattr(self, "data", None):
                self._log_results(model)
            for name in (checkpoint.LAST, "best.npz"):  # best.npz: early stopping's best epoch (dpcnn.early_stop)
                if self.tracker.enabled and self.ckpt_dir.joinpath(name).exists():
                    self.tracker.log_artifact(self.ckpt_dir / name, "checkpoints")
        except BaseException:
            status = "FAILED" if status == "FINISHED" else status  # the end itself failed
            raise
        finally:
            # The queue drains while the server answers (and up to tracking.flush_timeout while it does not,
            # unless a signal says stop); what it did not take stays in the journal, whatever the exit path.
            self.tracker.end(status, interrupted=self.interrupted)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
