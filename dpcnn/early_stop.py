"""Ending a run at an epoch boundary, at the same epoch on every rank: early stopping and a sweep's pruner.

Both decide from the epoch's figures (``val_acc``, ``test_loss``, ...), which
every rank holds bit for bit: they come out of the evaluation's allreduce. So
early stopping needs no communication at all: every rank reaches the same
verdict at the same epoch. A sweep's pruner lives on rank 0 (Optuna); its
verdict is broadcast at the epoch boundary (`dpcnn.sweep.trial.TrialState.report_epoch`).

``trainer.early_stopping.monitor=val_acc patience=3 min_delta=0.001``: after
every epoch the monitored figure either improves on the best so far by more
than ``min_delta`` (the weights are kept in memory and as
``checkpoints/best.npz``, written atomically by rank 0) or the wait grows;
after ``patience`` epochs without an improvement the run stops. The reason is
written into the epoch's history (so ``last.npz`` holds it, and a resume of a
stopped run trains nothing more) and into MLflow (tag ``dpcnn.stop_reason``).
With ``restore_best`` (the default) the run ends with the best epoch's
weights: they are what is logged as the model, and the run's final figures
and objective are that epoch's.

The whole state is a function of the history, so a resumed run rebuilds it by
replaying the checkpoint's history (and reads the best weights back from
``best.npz``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from . import checkpoint
from .config import objective_name
from .dist import Dist
from .errors import DpcnnError
from .sweep.trial import TRIAL

log = logging.getLogger("dpcnn")

BEST = "best.npz"


def _figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss"))}


class EpochStopper:
    """Early stopping and sweep pruning for one run; the same object, and the same verdicts, on every rank."""

    def __init__(self, cfg: DictConfig, history: list, model, dist: Dist, ckpt_dir: Path):
        es = cfg.trainer.early_stopping
        self.monitor, self.patience, self.min_delta = es.monitor, int(es.patience), float(es.min_delta)
        self.restore, self.dist, self.epochs = bool(es.restore_best), dist, int(cfg.trainer.epochs)
        self.maximize = bool(self.monitor) and self.monitor.endswith("_acc")
        self.objective = objective_name(cfg)
        self.best = self.best_epoch = self.best_step = None
        self.best_metrics: dict = {}
        self.best_params: np.ndarray | None = None
        self.wait, self.reason, self.status = 0, None, "FINISHED"
        for metrics in history:  # a resumed run: the same state as if it had never stopped
            self._improved(metrics)
            self.reason = metrics.get("stopped", self.reason)
        if self.best_step is not None and self.restore and not self.reason:
            self.best_params = self._read_best(model, ckpt_dir / BEST)

    # --- early stopping ------------------------------------------------------------------
    def _improved(self, metrics: dict) -> bool:
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None or not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best + self.min_delta if self.maximize
                                       else value < self.best - self.min_delta)
        if better:
            self.best, self.best_epoch, self.best_step = value, metrics["epoch"], metrics["step"]
            self.best_metrics, self.wait = _figures(metrics), 0
        else:
            self.wait += 1
        return better

    def _read_best(self, model, path: Path) -> np.ndarray | None:
        """A resumed run's best weights: rank 0 reads best.npz (if it is the best epoch's), every rank gets them."""
        def read():
            try:
                ckpt = checkpoint.load(path) if path.is_file() else None
            except DpcnnError as e:  # a damaged best.npz costs the best weights, not the run
                log.warning("early stopping: %s", e)
                return False
            if ckpt is None or ckpt.step != self.best_step or ckpt.params.shape != model.params.shape:
                return False
            params[:] = ckpt.params
            return True

        params = np.zeros_like(model.params)
        if not self.dist.bcast(self.dist.agree(lambda: self.dist.is_root and read()), what="checkpoint"):
            if self.dist.is_root:
                log.warning("early stopping: %s is not the best epoch's (%s); the run keeps the best epoch of those "
                            "still to train", path, self.best_epoch)
            self.best = self.best_epoch = self.best_step = None
            return None
        self.dist.broadcast_(params)
        return params

    # --- after every epoch, on every rank ----------------------------------------------
    def after_epoch(self, pos, summary: dict, model, out) -> None:
        """Decide, from the epoch's figures just appended to ``pos.history``, whether the run ends here."""
        metrics = pos.history[-1]
        if self._improved(metrics):
            if self.restore:
                self.best_params = model.params.copy()
            error, _ = self.dist.bcast(out.save(model, {}, pos, name=BEST), what="checkpoint")
            if error:
                raise DpcnnError(error)
        elif self.monitor and self.wait >= self.patience:
            self.reason = (f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
                           f"{self.patience} epoch(s); best {self.best:.4f} at epoch {self.best_epoch}")
        last = metrics["epoch"] >= self.epochs
        if not self.reason and TRIAL.report_epoch(summary.get(self.objective, math.nan), metrics["epoch"],
                                                  self.dist, last):
            self.reason, self.status = f"pruned by the sweep's pruner at epoch {metrics['epoch']}", "KILLED"
        if self.reason:
            metrics["stopped"] = self.reason
            tags = {"dpcnn.stop_reason": self.reason, "dpcnn.stopped_epoch": str(metrics["epoch"])}
            if self.status == "KILLED":
                tags["dpcnn.sweep.pruned"] = str(metrics["epoch"])
            if self.best_epoch is not None:
                tags.update({"dpcnn.best_epoch": str(self.best_epoch),
                             f"dpcnn.best_{self.monitor}": f"{self.best:.6g}"})
            out.tracker.set_tags(tags)
            if self.dist.is_root:
                log.warning("%s; stopping after epoch %d of %d", self.reason, metrics["epoch"], self.epochs)

    def figures(self, last: dict) -> dict:
        """The run's figures: the best epoch's when its weights are the ones kept, else ``last``."""
        return dict(self.best_metrics) if self.restore and self.best_metrics else last

    def finish(self, model, summary: dict) -> tuple[str, dict]:
        """At the end of the loop: (the run's status, its figures); the best weights back in the model."""
        if self.status == "KILLED":
            return self.status, {}  # pruned: no objective (NaN); Optuna and MLflow record it PRUNED
        if self.best_params is None:
            return self.status, summary
        model.params[:] = self.best_params
        return self.status, self.figures(summary)
