"""One owner per run directory: a lock file that rank 0 takes before it writes anything.

Two jobs started with the same ``hydra.run.dir`` would prune each other's step
checkpoints and log each other's files. The lock (``<run dir>/.dpcnn.lock``,
JSON: pid, host, start time) is written and flocked under a private name,
then hard-linked into place, and held with ``flock`` while the job runs. A
lock whose owner is gone — a process that no longer exists on this host, or
whose ``flock`` was released because it died — is taken over with a warning,
so a resume after ``kill -9`` just works.
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
        """Take the lock, or raise ConfigError naming its owner.

        The lock is written and flocked under a private name first, then hard-linked into place, which
        fails if the name exists. So the file never exists empty or unlocked, and a job that starts at
        the same moment reads a whole owner, never mistakes the owner for a dead one and takes over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{NAME}.{socket.gethostname()}.{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            os.fsync(fd)
            for _ in range(20):  # a stale lock is removed, then linked again; another job may win that race
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                except OSError as e:  # EPERM/ENOTSUP: a filesystem without hard links (some FUSE and SMB mounts)
                    raise ConfigError(f"cannot create the lock {self.path}: {e.strerror}; put hydra.run.dir on a "
                                      f"filesystem with hard links (local disk, NFS, Lustre, GPFS)") from e
                self._fd, fd = fd, None
                return self
        finally:
            tmp.unlink(missing_ok=True)
            if fd is not None:
                os.close(fd)
        raise ConfigError(f"could not take the lock {self.path}; another job keeps taking it")

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its owner is gone; raise ConfigError naming the owner if it runs.
        Returns without removing anything when the lock changed under us (the caller tries again)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if not _same_file(fd, self.path):
                return
            owner = _read_owner(fd)
            if _alive(owner, fd):
                raise ConfigError(
                    f"run directory {self.path.parent} is in use by pid {owner.get('pid')} on host "
                    f"{owner.get('host')} (since {owner.get('started')}); give this job another hydra.run.dir, "
                    f"or, if that job is gone, delete {self.path}")
            try:  # hold the dead lock's flock while removing it, so a second job taking over waits
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another job is taking it over right now; the caller tries again
                time.sleep(0.01)
                return
            if _same_file(fd, self.path):
                log.warning("taking over %s from pid %s on %s, which is gone", self.path, owner.get("pid"),
                            owner.get("host"))
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _read_owner(fd: int) -> dict:
    """The owner recorded in the open lock file fd (the one whose inode was checked), {} if unreadable."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _pid_gone(owner: dict) -> bool:
    """Whether the owner ran on this host under a pid that no longer exists."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _alive(owner: dict, fd: int) -> bool:
    """Whether the lock's owner still runs: its ``flock`` is held and, on this host, its pid exists
    (a pid alone could have been reused; flock alone can be unreliable on some network filesystems)."""
    if _pid_gone(owner):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
