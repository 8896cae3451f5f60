"""The typed configuration: one dataclass per config group, registered with Hydra.

Hydra merges `conf/` into these schemas while it composes, so a value of the
wrong type (``optimizer.momentum=abc``) or a key that does not exist
(``trainer.foo=1``) is an error before any rank computes; `validate` then
checks the ranges. The defaults of every key live here; the YAML files in
`conf/` choose among them and document them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .buckets import WIRES
from .errors import ConfigError


@dataclass
class ModelConf:
    name: str = "small"
    init: str = "fan_in_uniform"        # or he_normal (dpcnn.model.Model.init)
    layers: List[Dict[str, Any]] = field(default_factory=list)
    input_shape: Optional[List[int]] = None  # null: the data's (set from the data when training starts)


@dataclass
class OptimizerConf:
    name: str = "sgd"
    algorithm: str = "sgd"              # sgd | adam (dpcnn.optim.make_optimizer)
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    eps: float = 1.0e-8                 # adam
    decoupled: bool = False             # adam: true is AdamW (decoupled weight decay)
    schedule: str = "constant"          # constant | step | cosine
    warmup_steps: int = 0
    step_epochs: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class AugmentConf:
    enabled: bool = False
    max_shift: int = 2
    hflip: bool = False                 # random horizontal flips (cifar10); never for digits


@dataclass
class DataConf:
    name: str = "mnist"
    root: Optional[str] = None
    train_subset: Optional[int] = None
    val_fraction: float = 0.0
    val_seed: int = 0
    verify_checksum: bool = False       # true: files that are not the official ones are an error, not a warning
    download: bool = True
    normalize: bool = True
    augment: AugmentConf = field(default_factory=AugmentConf)
    num_classes: Optional[int] = None   # null: from the data (registry, labels, class folders)
    # The user's own data (format npz / image_folder): the file or folder, and how to decode images.
    format: Optional[str] = None        # null: the registry's (idx for new datasets given by data.files)
    path: Optional[str] = None
    image_size: Optional[List[int]] = None
    channels: Optional[int] = None
    test_fraction: float = 0.0          # image folders without train/ and test/: the share held out as test set
    # Registry overrides (dpcnn.data.get_spec): null keeps the registered value (own data: its statistics).
    # Set from the data when training starts, so checkpoints and the served model record them.
    mean: Optional[Any] = None          # one value, or one per channel
    std: Optional[Any] = None
    class_names: Optional[List[str]] = None
    # {name: value} maps. Typed Any: a null Optional[Dict] node cannot take data.md5={name:md5} from the
    # command line (OmegaConf fails on it); get_spec checks and converts them.
    files: Any = None
    md5: Any = None
    raw_md5: Any = None
    mirrors: Optional[List[str]] = None


@dataclass
class EarlyStoppingConf:
    monitor: Optional[str] = None       # val_acc | val_loss | test_acc | test_loss | train_acc | train_loss; null: off
    patience: int = 3                   # epochs without an improvement before stopping
    min_delta: float = 0.0              # what counts as an improvement
    restore_best: bool = True           # log (and return the figures of) the best epoch's weights, best.npz


@dataclass
class TrainerConf:
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 64
    drop_last: bool = False
    dtype: str = "float32"
    eval_batch_size: int = 1000
    log_every: int = 10
    progress: bool = True
    checkpoint: bool = True
    keep_last: int = 1
    resume: Optional[str] = None
    resume_strict: bool = True
    checkpoint_every: Optional[int] = None
    micro_batch: Optional[int] = None
    overlap: bool = True             # start each gradient bucket's Allreduce as backward writes it (dpcnn.buckets)
    bucket_bytes: int = 262144       # a bucket gathers layers' gradients (from the last) to at least this size
    grad_compression: str = "none"   # none | fp16 | bf16: gradients cross the wire in 16 bits, error feedback
    profile: bool = False            # timeline.json (Chrome trace) + timeline.png per epoch (dpcnn.timeline)
    stall_warning: Optional[float] = 60.0        # s a collective waits before the missing ranks are named
    collective_timeout: Optional[float] = 600.0  # s the step's collective may wait; then the job ends (exit 1)
    setup_timeout: Optional[float] = 1800.0      # the same for set-up, data, evaluation, checkpoints, the end
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)


@dataclass
class TrackingConf:
    backend: str = "mlflow"
    uri: Optional[str] = None
    experiment: str = "dpcnn"
    run_name: Optional[str] = None
    datasets: bool = True
    plots: bool = True
    activation_images: int = 4
    log_model: bool = True
    register_as: Optional[str] = None
    system_metrics: bool = False
    system_metrics_interval: float = 10.0
    retry_interval: float = 5.0
    flush_timeout: float = 60.0
    queue_size: int = 10000         # records held in memory for the server; beyond, they wait in the journal
    trial_wait: float = 120.0       # s a sweep trial waits at its start for an unreachable server


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    optimizer: OptimizerConf = field(default_factory=OptimizerConf)
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    seed: int = 0


ConfigStore.instance().store(name="dpcnn_schema", node=Config, provider="dpcnn")
_SCHEMAS = {c.__name__: c for c in (ModelConf, OptimizerConf, AugmentConf, DataConf, TrainerConf, TrackingConf,
                                     EarlyStoppingConf)}

_CHOICES = {"trainer.dtype": ("float32", "float64"), "optimizer.schedule": ("constant", "step", "cosine"),
            "optimizer.algorithm": ("sgd", "adam"),
            "tracking.backend": ("mlflow", "none"), "model.init": ("fan_in_uniform", "he_normal"),
            "trainer.grad_compression": WIRES}
# key: (lowest allowed, whether the bound is inclusive, may it be null, example)
_RANGES = {
    "trainer.epochs": (1, True, False, 10), "trainer.max_steps": (1, True, True, 100),
    "trainer.batch_size": (1, True, False, 64), "trainer.eval_batch_size": (1, True, False, 1000),
    "trainer.log_every": (1, True, False, 10), "trainer.keep_last": (0, True, False, 1),
    "trainer.checkpoint_every": (1, True, True, 500), "trainer.micro_batch": (1, True, True, 16),
    "trainer.stall_warning": (0, False, True, 60), "trainer.collective_timeout": (0, False, True, 600),
    "trainer.setup_timeout": (0, False, True, 1800), "trainer.bucket_bytes": (0, True, False, 262144),
    "optimizer.lr": (0, False, False, 0.05), "optimizer.momentum": (0, True, False, 0.9),
    "optimizer.weight_decay": (0, True, False, 5e-4), "optimizer.warmup_steps": (0, True, False, 100),
    "optimizer.step_epochs": (1, True, False, 10), "optimizer.gamma": (0, False, False, 0.1),
    "optimizer.min_lr": (0, True, False, 0.0), "optimizer.eps": (0, False, False, 1e-8),
    "data.train_subset": (1, True, True, 1000),
    "data.val_fraction": (0, True, False, 0.1), "data.augment.max_shift": (0, True, False, 2),
    "data.test_fraction": (0, True, False, 0.2), "data.num_classes": (1, True, True, 10),
    "trainer.early_stopping.patience": (1, True, False, 3), "trainer.early_stopping.min_delta": (0, True, False, 0.001),
    "tracking.activation_images": (0, True, False, 4), "tracking.system_metrics_interval": (0, False, False, 10),
    "tracking.retry_interval": (0, False, False, 5), "tracking.flush_timeout": (0, True, False, 60),
    "tracking.queue_size": (1, True, False, 10000), "tracking.trial_wait": (0, True, False, 120),
}
_BELOW_ONE = ("optimizer.momentum", "data.val_fraction", "data.test_fraction")  # also < 1
#: What early stopping may watch: the epoch's figures every rank has (they come out of the allreduce).
MONITORS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss")


def objective_name(cfg: DictConfig) -> str:
    """What a run (or a sweep trial) returns and a sweep compares: validation accuracy when the config
    holds out a validation split (``data.val_fraction > 0``: it then always has an example), else test
    accuracy. The one rule, for `dpcnn.train` and `dpcnn.sweep` alike."""
    return "val_acc" if (OmegaConf.select(cfg, "data.val_fraction", default=0) or 0) > 0 else "test_acc"


def unknown_key_hint(message: str) -> str | None:
    """For OmegaConf's "Key 'foo' not in 'TrainerConf'": the keys that do exist there."""
    m = re.search(r"Key '([^']+)' not in '(\w+)'", message)
    schema = {**_SCHEMAS, "Config": Config}.get(m.group(2)) if m else None
    if schema is None:
        return None
    return f"valid keys there: {', '.join(f.name for f in fields(schema))}"


def one_line(e: BaseException) -> str:
    """An exception's message and its cause's, on one line: Hydra's suggestions kept, OmegaConf's
    key/type trailer and Hydra's search path dropped, a list of options joined with commas."""
    text = "\n".join([str(e)] + ([str(e.__cause__)] if e.__cause__ and str(e.__cause__) not in str(e) else []))
    text = text.split("Config search path:")[0].replace("Set the environment variable HYDRA_FULL_ERROR=1 "
                                                         "for a complete stack trace.", "")
    parts: list[str] = []
    for ln in text.splitlines():
        if ln.strip().startswith(("full_key:", "object_type", "reference_type")) or not ln.strip():
            continue
        if ln[0].isspace() and parts:  # an indented option list: one comma-separated clause
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + ln.strip()
        else:
            parts.append(ln.strip().rstrip("."))
    unknown = unknown_key_hint(str(e.__cause__ or e))
    if unknown:  # a structured config accepts no new keys: "+key=" would fail too
        parts = [p for p in parts if not p.startswith("To append to your config")] + [unknown]
    return "; ".join(dict.fromkeys(parts))


def _no_unknown_keys(cfg: DictConfig, schema: type = Config, prefix: str = "") -> None:
    """Keys the schema does not have (Hydra lets ``+key=value`` add them even to a typed config)."""
    names = {f.name: f.type for f in fields(schema)}
    for key in cfg.keys():
        if key not in names:
            hint = unknown_key_hint(f"Key '{key}' not in '{schema.__name__}'")
            raise ConfigError(f"{prefix}{key} is not a dpcnn setting ({hint}); remove it from the command line")
        sub = _SCHEMAS.get(str(names[key]).split(".")[-1].strip("'>"))
        if sub is not None and isinstance(cfg[key], DictConfig):
            _no_unknown_keys(cfg[key], sub, f"{prefix}{key}.")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig, world_size: int) -> None:
    """Range checks the types cannot express: fail in seconds, before any data or compute.

    Every problem is one `ConfigError` naming the key, the value and a valid example.
    """
    _no_unknown_keys(cfg)
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {_get(cfg, key)!r}; "
                              f"e.g. {key}={choices[0]}")
    for key, (low, inclusive, nullable, example) in _RANGES.items():
        value = _get(cfg, key)
        if value is None and nullable:
            continue
        ok = value is not None and math.isfinite(value) and (value >= low if inclusive else value > low)
        if key in _BELOW_ONE:
            ok = ok and value < 1
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low}" + (" and < 1" if key in _BELOW_ONE else "")
            raise ConfigError(f"{key} must be {bound}{' or null' if nullable else ''}, got {value}; "
                              f"e.g. {key}={example}")
    _check_data_and_stopping(cfg)
    betas = list(cfg.optimizer.betas)
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas}; "
                          "e.g. optimizer.betas=[0.9,0.999]")
    t = cfg.trainer
    if t.batch_size < world_size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is the GLOBAL batch and is smaller than the "
                          f"{world_size} ranks; use trainer.batch_size>={world_size} or fewer ranks")
    _batchnorm_groups(cfg, world_size)


def _check_data_and_stopping(cfg: DictConfig) -> None:
    """The data's own keys (channels, image size) and early stopping's monitor."""
    d, es = cfg.data, cfg.trainer.early_stopping
    if d.channels is not None and d.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (grey) or 3 (RGB), got {d.channels}; e.g. data.channels=3")
    if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise ConfigError(f"data.image_size must be [height, width], got {list(d.image_size)}; "
                          "e.g. data.image_size=[32,32]")
    if es.monitor is None:
        return
    if es.monitor not in MONITORS:
        raise ConfigError(f"trainer.early_stopping.monitor must be one of {', '.join(MONITORS)} or null, got "
                          f"{es.monitor!r}; e.g. trainer.early_stopping.monitor=val_acc")
    if es.monitor.startswith("val_") and not d.val_fraction:
        raise ConfigError(f"trainer.early_stopping.monitor={es.monitor} needs a validation split: set "
                          "data.val_fraction, e.g. data.val_fraction=0.1 (or monitor test_acc, which tunes on the "
                          "test set)")


def _batchnorm_groups(cfg: DictConfig, world_size: int) -> None:
    """Batchnorm takes its statistics over the micro-batches of ``trainer.micro_batch``, cut at fixed positions
    of the global batch; they are the same at every world size only if no rank splits one (README)."""
    if not any(isinstance(layer, DictConfig) and layer.get("type") == "batchnorm" for layer in cfg.model.layers):
        return
    t, micro = cfg.trainer, cfg.trainer.micro_batch
    per_rank = t.batch_size // world_size if t.batch_size % world_size == 0 else None
    fits = [d for d in range(1, 33) if per_rank and per_rank % d == 0]
    hint = f"trainer.micro_batch={fits[-1]}" if fits else f"trainer.batch_size={world_size * 32}"
    if micro is None:
        raise ConfigError("a model with batchnorm needs trainer.micro_batch: batch statistics are taken over "
                          "fixed micro-batches of the global batch, so they do not depend on the world size; "
                          f"e.g. {hint}")
    if t.batch_size % (world_size * micro):
        raise ConfigError(f"trainer.batch_size={t.batch_size} over {world_size} ranks is not whole micro-batches of "
                          f"trainer.micro_batch={micro}: batchnorm statistics of a micro-batch split between ranks "
                          f"would depend on the world size; use a global batch that is a multiple of ranks x "
                          f"micro_batch, or e.g. {hint}")
