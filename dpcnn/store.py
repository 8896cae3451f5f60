"""The MLflow store behind a run: which URI, whether it can be used, and opening it safely.

* `default_uri` / `existing_store`  where runs go (and refusing to invent an empty store for readers)
* `check_uri`                        a URI that cannot be a tracking store, said in one line before MLflow sees it
* `fail_fast`                        the HTTP retry limits every dpcnn command uses (no 4-minute silences)
* `open_client`                      an ``MlflowClient`` whose store is created or migrated under a file lock,
                                     a half-migrated SQLite store repaired; every failure a `TrackingError`
* `why`, `transient`                 a few words for an error, and whether trying again can help

Nothing here imports mlflow at load time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from .errors import DpcnnError

log = logging.getLogger(__name__)

#: URI schemes MLflow can track to (and dpcnn is tested with the first four).
SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
#: HTTP limits of every dpcnn command: one attempt, a 10 s timeout (the tracker retries by itself).
HTTP_TIMEOUT_S = 10


class TrackingError(DpcnnError):
    """The tracking store cannot be used: a bad URI, a server that cannot be reached or refuses the run."""

    #: Not the trial's fault: a sweep does not report a "best" while such failures stand (dpcnn.sweep).
    infrastructure = True


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else SQLite ``mlflow.db`` in the directory the user ran from."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for any other URI or an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def existing_store(uri: str | None = None) -> str:
    """``uri`` (default: `default_uri`), refusing a SQLite file that does not exist.

    For commands that read runs (``dpcnn.predict``, ``dpcnn.viz``): MLflow would
    otherwise create an empty ``mlflow.db`` and then report "run not found".
    """
    uri = check_uri(uri or default_uri())
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(f"no MLflow store at {uri}: run this where you trained (where mlflow.db is), or pass "
                            "tracking_uri=... (or set MLFLOW_TRACKING_URI)")
    try:
        probe(uri)
    except ConnectionError as e:
        raise unreachable(uri, e) from None
    return uri


def check_uri(uri: str) -> str:
    """``uri`` if it can be a tracking store; else a `TrackingError` saying why and what to use."""
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES and not (scheme and scheme.split("+")[0] in SCHEMES):
        raise TrackingError(f"tracking URI {uri!r} has {'scheme ' + repr(scheme) if scheme else 'no scheme'}, "
                            "which MLflow cannot track to; use sqlite:///path/mlflow.db, http://host:port (an "
                            "mlflow server) or file:///absolute/dir, or run with tracking=none")
    path = sqlite_path(uri)
    if path is not None and path.exists():
        with open(path, "rb") as f:
            head = f.read(16)
        if path.is_dir() or (head and head != b"SQLite format 3\x00"):
            raise TrackingError(f"{path} is not an SQLite database (tracking URI {uri}); point tracking.uri at an "
                                "mlflow.db file, or at a new file name to create one")
    if scheme == "file":
        target = Path(urlparse(uri).path or "/")
        if target == Path("/") or (target.exists() and not target.is_dir()):
            raise TrackingError(f"tracking URI {uri} must name a directory for MLflow's file store (not / or a "
                                "file), e.g. file:///home/me/mlruns; or use sqlite:///mlflow.db")
    return uri


def probe(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) store: raise ``ConnectionError`` at once if nothing answers there (before MLflow is
    even imported, which takes seconds). Any HTTP answer, an error status included, counts as an answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"{uri}: {reason}") from None


def fail_fast() -> None:
    """MLflow's HTTP client: no retries of its own (minutes by default), a short timeout, no progress bars."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # urllib3 logs every retry and dropped connection as a warning; dpcnn says it once, in one line.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def why(e: BaseException) -> str:
    """A few words for why an MLflow call failed, instead of urllib3's paragraph."""
    text = str(e)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Read timed out", "timed out"), ("Name or service not known", "unknown host"),
                          ("nodename nor servname", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host"),
                          ("Connection reset", "connection reset"), ("RemoteDisconnected", "connection closed"),
                          ("Max retries exceeded", "no answer"), ("database is locked", "database is locked")):
        if needle in text:
            return short
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


#: MLflow error codes that mean "the server answered and will never accept this call".
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                              "MALFORMED_REQUEST", "NOT_IMPLEMENTED"})


def transient(e: BaseException) -> bool:
    """True when trying again later can help: the server is away, slow or busy; False if it refused."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()
    if isinstance(e, MlflowException):
        if e.error_code in PERMANENT_ERRORS:
            return False
        return any(s in str(e) for s in ("Max retries", "Connection", "timed out", "database is locked",
                                         "503", "502", "504", "API request to", "TEMPORARILY_UNAVAILABLE"))
    try:
        from requests import RequestException
    except ImportError:  # pragma: no cover
        RequestException = OSError
    return isinstance(e, (OSError, RequestException, TimeoutError, ConnectionError)) or \
        "database is locked" in str(e)


# ----------------------------------------------------------------------------- opening a store

@contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _repair_sqlite(path: Path, uri: str) -> None:
    """A store whose schema is behind this MLflow (a migration cut short, or an older MLflow): back it up,
    drop alembic's leftover ``_alembic_tmp_*`` tables and finish the migration. Under the store's lock."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version, _upgrade_db

    engine = sqlalchemy.create_engine(uri)
    try:
        current, head = _get_schema_version(engine), _get_latest_schema_revision()
        if current is None or current == head:
            return
        backup = path.with_name(f"{path.name}.bak-{current}")
        shutil.copy2(path, backup)
        with sqlite3.connect(path) as db:
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE "
                                      "'\\_alembic\\_tmp\\_%' ESCAPE '\\'").fetchall():
                db.execute(f'DROP TABLE "{name}"')
        _upgrade_db(engine)
        log.warning("MLflow store %s was at schema %s (a migration cut short, or an older MLflow); migrated it "
                    "to %s under a lock (the old file is kept as %s)", path, current, head, backup)
    except Exception as e:  # noqa: BLE001 - named in one line, with the fix
        raise TrackingError(f"MLflow store {path} is half-migrated and could not be repaired ({why(e)}); restore "
                            f"a backup (e.g. {path.name}.bak-*) and run 'mlflow db upgrade {uri}', or move it "
                            "aside to start a new store") from None
    finally:
        engine.dispose()


def open_client(uri: str | None = None):
    """An ``MlflowClient`` for ``uri`` whose store is usable: checked, created or migrated under a file lock.

    Any number of jobs may start at once on a fresh ``sqlite:///`` store: the first creates the schema
    while the others wait on ``<db>.lock``. A half-migrated store is repaired (see `_repair_sqlite`).
    Raises `TrackingError` (one line) for a bad URI or a store that cannot be opened.
    """
    fail_fast()
    uri = check_uri(uri or default_uri())
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    try:
        if path is None:
            return MlflowClient(tracking_uri=uri)
        with _file_lock(path.with_name(path.name + ".lock")):
            if path.exists() and path.stat().st_size:
                _repair_sqlite(path, uri)
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates the schema, inside the lock
            return client
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(f"cannot open the MLflow store {uri} ({why(e)}); fix tracking.uri or run with "
                            "tracking=none") from None


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created if needed (another job creating it at the same moment is fine)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        exp = client.get_experiment_by_name(name)  # created by a job started at the same time
        if exp is None:
            raise
        return exp.experiment_id


def create_run_once(client, experiment: str, run_name: str | None, tags: dict, key: str):
    """``client.create_run``, safe to retry: a run tagged ``dpcnn.run_key=key`` that an earlier attempt
    created (its answer lost in an outage) is found and used instead of creating a second one."""
    found = client.search_runs([experiment], filter_string=f"tags.`dpcnn.run_key` = '{key}'", max_results=1)
    if found:
        return found[0]
    return client.create_run(experiment, run_name=run_name, tags={**tags, "dpcnn.run_key": key})


def unreachable(uri: str, e: BaseException) -> TrackingError:
    """The one line for a store that did not answer."""
    hint = ""
    if uri.startswith(("http://", "https://")):
        hint = " (e.g. mlflow server --host 127.0.0.1 --port <port> --backend-store-uri sqlite:///mlflow.db)"
    return TrackingError(f"cannot reach the MLflow tracking store at {uri} ({why(e)}); start the server{hint}, "
                         "fix tracking.uri, or run with tracking=none")


def retry(fn, what: str, wait: float, uri: str, interval: float = 2.0):
    """``fn()``, tried again while it fails transiently, for up to ``wait`` s (one warning line); else raises."""
    deadline, warned = time.monotonic() + max(wait, 0.0), False
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() + interval > deadline:
                raise
            if not warned:
                log.warning("MLflow at %s is unreachable (%s) for %s; waiting up to %.0f s for it", uri, why(e),
                            what, wait)
                warned = True
            time.sleep(interval)
