"""One owner per run directory: a lock file that rank 0 takes before it writes anything.

Two jobs started with the same ``hydra.run.dir`` would prune each other's step
checkpoints and log each other's files. The lock (``<run dir>/.dpcnn.lock``,
JSON: pid, host, start time) is created exclusively and held with ``flock``
while the job runs. A lock whose owner is gone — a process that no longer
exists on this host, or whose ``flock`` was released because it died — is
taken over with a warning, so a resume after ``kill -9`` just works.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("dpcnn")
NAME = ".dpcnn.lock"


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        """Take the lock, or raise ConfigError naming its owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then created again; another job may win that race
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # created by another job between our check and our open
                os.close(fd)
                continue
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise ConfigError(f"could not take the lock {self.path}; another job keeps taking it")

    def _take_over_if_stale(self) -> None:
        owner = self.owner()
        if _alive(owner, self.path):
            raise ConfigError(
                f"run directory {self.path.parent} is in use by pid {owner.get('pid')} on host {owner.get('host')} "
                f"(since {owner.get('started')}); give this job another hydra.run.dir, or, if that job is gone, "
                f"delete {self.path}")
        log.warning("taking over %s from pid %s on %s, which is gone", self.path, owner.get("pid"), owner.get("host"))
        self.path.unlink(missing_ok=True)

    def owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _alive(owner: dict, path: Path) -> bool:
    """Whether the lock's owner still runs: its ``flock`` is held and, on this host, its pid exists
    (a pid alone could have been reused; flock alone can be unreliable on some network filesystems)."""
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
