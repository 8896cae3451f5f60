"""Atomic, pickle-free checkpoints of everything a resume needs.

A checkpoint is an ``.npz`` of plain arrays: ``params``, the optimizer state
(``opt.<name>``) and ``meta``, a JSON string (step, epoch, position in the
epoch, the composed config as YAML, metric history, MLflow run id, a SHA-256 of
every array). It is written to a temporary file in the same directory and
renamed into place, so a crash mid-write never leaves a half checkpoint where a
good one was. Loading uses ``allow_pickle=False`` and checks the digests, so a
truncated or tampered file is an error, never silent garbage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CheckpointError

FORMAT_VERSION = 1
LAST = "last.npz"


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


@dataclass
class Checkpoint:
    params: np.ndarray
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def save(directory: str | Path, ckpt: Checkpoint, keep_last: int = 1, name: str = LAST) -> Path:
    """Write ``last.npz`` and (``keep_last`` >= 1) ``step-<step>.npz``, each atomically.

    ``last.npz`` is a copy of its own, not a link to the step file, so damage to one
    file leaves the other intact. Keeps the newest ``keep_last`` step files (0: none,
    ``last.npz`` only). Another ``name`` (``best.npz``) writes that one file only.
    Raises CheckpointError (the previous checkpoint intact) if the directory cannot
    be written. Returns the path written last.
    """
    directory = Path(directory)
    arrays = {"params": ckpt.params, **{f"opt.{k}": v for k, v in ckpt.optimizer.items()}}
    meta = {**ckpt.meta, "format": FORMAT_VERSION, "digests": {k: _digest(v) for k, v in arrays.items()}}
    blob = io.BytesIO()
    np.savez(blob, meta=np.array(json.dumps(meta)), **arrays)
    if name != LAST:
        keep_last = -1  # that file alone: no step files written, none removed
    targets = ([directory / f"step-{ckpt.step:08d}.npz"] if keep_last > 0 else []) + [directory / name]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for target in targets:
            _write_atomically(target, blob.getbuffer())
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint in {directory}: {e.strerror or e}; free disk space or point "
                              f"hydra.run.dir at a writable directory (the previous checkpoint is intact)") from None
    steps = list_steps(directory) if keep_last >= 0 else []
    for old in steps[:len(steps) - keep_last] if keep_last > 0 else steps:
        old.unlink(missing_ok=True)
    return targets[-1]


def _write_atomically(target: Path, data) -> None:
    """Write to a temporary file beside ``target``, fsync, rename over it: never a half-written file."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", suffix=".npz", delete=False) as f:
            tmp = Path(f.name)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def fallbacks(path: Path) -> str:
    """Advice naming the other good checkpoints beside ``path``, if there are any."""
    others = [p.name for p in list_steps(path.parent) if p != path][::-1]
    if others:
        return f"resume from another checkpoint beside it ({', '.join(others[:3])}) or start a fresh run"
    return "there is no other checkpoint beside it: start a fresh run"


def load(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; raises CheckpointError naming the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    fix = fallbacks(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; check trainer.resume")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); {fix}") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        digests = meta["digests"]
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path}: checkpoint has no valid metadata; {fix}") from None
    if set(digests) != set(arrays):
        raise CheckpointError(f"{path}: checkpoint arrays {sorted(arrays)} do not match its metadata; {fix}")
    for k, a in arrays.items():
        if _digest(a) != digests[k]:
            raise CheckpointError(f"{path}: array {k!r} fails its SHA-256 check (corrupted or tampered); {fix}")
    if "params" not in arrays:
        raise CheckpointError(f"{path}: checkpoint has no params; {fix}")
    optimizer = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
    return Checkpoint(params=arrays["params"], optimizer=optimizer, meta=meta)


def list_steps(directory: str | Path) -> list[Path]:
    """The step checkpoints in ``directory``, oldest first."""
    return sorted(p for p in Path(directory).glob("step-*.npz") if re.fullmatch(r"step-\d{8}\.npz", p.name))
