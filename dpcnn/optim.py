"""SGD with momentum, Nesterov and weight decay on the flat parameter buffer; LR schedules.

The update touches three flat arrays (params, grads, velocity) with a few
vectorised in-place operations: no per-layer loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from .errors import ConfigError


class SGD:
    """p <- p - lr * d, where (PyTorch's convention, so recipes carry over):

    g = grad + weight_decay * p
    v = momentum * v + g                  (if momentum > 0)
    d = g + momentum * v  (Nesterov)  or  v  (classical)  or  g (plain SGD)
    """

    def __init__(self, params: np.ndarray, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"momentum ({momentum}) and weight_decay ({weight_decay}) must be >= 0")
        if nesterov and momentum == 0:
            raise ConfigError("nesterov=true needs momentum > 0; set optimizer.momentum (e.g. 0.9)")
        self.params = params
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.velocity = np.zeros_like(params) if momentum else None

    def step(self, grads: np.ndarray, lr: float) -> None:
        """One update, in place. ``grads`` is used as scratch space (overwritten)."""
        g = grads
        if self.weight_decay:
            g += self.weight_decay * self.params
        if self.velocity is not None:
            v = self.velocity
            v *= self.momentum
            v += g
            if self.nesterov:
                g += self.momentum * v
            else:
                g = v
        self.params -= np.asarray(lr, self.params.dtype) * g

    def state(self) -> dict[str, np.ndarray]:
        """Arrays a resume needs (saved in the checkpoint)."""
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.velocity is None:
            return
        v = state.get("velocity")
        if v is None or v.shape != self.velocity.shape:
            raise ConfigError("the checkpoint has no matching momentum buffer; resume with the optimizer it was "
                              "trained with")
        self.velocity[:] = v


def make_optimizer(params: np.ndarray, cfg: Mapping) -> SGD:
    return SGD(params, momentum=cfg.get("momentum", 0.0), nesterov=cfg.get("nesterov", False),
               weight_decay=cfg.get("weight_decay", 0.0))


def make_schedule(cfg: Mapping, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """lr(step) for step = 0, 1, ...: linear warmup, then constant, step or cosine decay.

    cfg keys: lr, schedule (constant|step|cosine), warmup_steps, step_epochs and
    gamma (step: multiply by gamma every step_epochs epochs), min_lr (cosine floor).
    """
    base = float(cfg["lr"])
    if not base > 0 or not math.isfinite(base):
        raise ConfigError(f"optimizer.lr must be a positive number, got {cfg['lr']}; e.g. optimizer.lr=0.05")
    kind = cfg.get("schedule", "constant")
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    min_lr = float(cfg.get("min_lr", 0.0) or 0.0)
    gamma = float(cfg.get("gamma", 0.1))
    step_epochs = int(cfg.get("step_epochs", 10) or 10)
    if kind not in ("constant", "step", "cosine"):
        raise ConfigError(f"unknown optimizer.schedule {kind!r}; use constant, step or cosine")

    def lr(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        if kind == "constant":
            return base
        if kind == "step":
            return base * gamma ** (step // (step_epochs * steps_per_epoch))
        span = max(total_steps - warmup, 1)
        t = min(step - warmup, span) / span
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))

    return lr
