"""The tracking journal: every MLflow record of a run, on disk, in plain JSON, replayable.

Rank 0's tracker appends each record (params, metric points with their own
step and timestamp, tags, artifacts by path, texts, tables, dataset inputs,
the model, the final status) to ``<run dir>/mlflow_journal/<run id>.jsonl``
*before* it is queued for the server: a write-ahead log, one JSON object per
line, so even a ``kill -9`` leaves everything up to the last record. It is
also where the bounded queue spills: records beyond the queue's limit stay
only here and are read back in order.

At the end of the run:

* everything reached MLflow: the journal is deleted;
* something did not: it becomes ``<run id>.json`` (one JSON document, every
  record of the run, full values; no pickle anywhere) and the run's last line
  says where it is and the command that sends it::

      python -m dpcnn.tracking replay <run dir>

Replay (`replay_dir`) sends a journal idempotently (`dpcnn.replay.Replay`:
what the run already holds is not sent again, so a second replay adds
nothing), sets the run's real final status and the tag ``dpcnn.replayed``, and
renames the journal ``<run id>.replayed.json``. A run resumed in the same run
directory replays earlier journals there first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DIR = "mlflow_journal"
FORMAT = 1
COMMAND = "python -m dpcnn.tracking replay"


class Journal:
    """The write-ahead journal of one MLflow run (rank 0). Thread-safe appends; records numbered from 0."""

    def __init__(self, run_dir: str | Path, run_id: str, uri: str, experiment_id: str):
        self.dir = Path(run_dir) / DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.uri = run_id, uri
        self.path = self.dir / f"{run_id}.jsonl"
        self.header = {"journal": FORMAT, "run_id": run_id, "uri": uri, "experiment_id": experiment_id,
                       "created": time.time()}
        self._lock = threading.Lock()
        self._offsets: list[int] = []  # byte offset of record n's line
        self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - open for the run's lifetime
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() == 0:
            self._write_line(self.header)
        self.broken: str | None = None  # why the journal could not be written (disk full): said once

    def _write_line(self, obj: dict) -> int:
        offset = self._file.tell()
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._file.flush()
        return offset

    @property
    def count(self) -> int:
        return len(self._offsets)

    def append(self, record: dict) -> int:
        """Write ``record`` (a JSON-able dict with an ``op``); returns its number."""
        with self._lock:
            seq = len(self._offsets)
            try:
                self._offsets.append(self._write_line({**record, "seq": seq}))
            except (OSError, ValueError) as e:
                self._offsets.append(-1)
                if self.broken is None:
                    self.broken = str(e)
                    log.warning("the MLflow journal %s cannot be written (%s): records that do not reach "
                                "MLflow may be lost", self.path, e)
            return seq

    def read(self, start: int, limit: int) -> list[dict]:
        """Records ``start`` .. ``start + limit - 1`` (those written so far), read back from disk."""
        with self._lock:
            offsets = self._offsets[start:start + limit]
        out = []
        with open(self.path, encoding="utf-8") as f:
            for off in offsets:
                if off < 0:
                    continue
                f.seek(off)
                out.append(json.loads(f.readline()))
        return out

    def close(self, unsent: int, status: str) -> Path | None:
        """End of the run: delete the journal if everything was sent, else write ``<run id>.json``."""
        with self._lock:
            self._file.close()
        if not unsent:
            self.path.unlink(missing_ok=True)
            _remove_tree(self.dir / f"{self.run_id}.model")
            try:
                self.dir.rmdir()  # only if empty
            except OSError:
                pass
            return None
        doc = load(self.path)
        doc.update(status=status, unsent=unsent)
        out = self.dir / f"{self.run_id}.json"
        write_json(out, doc)
        self.path.unlink(missing_ok=True)
        return out

    def model_dir(self) -> Path:
        """Where the model's files wait until they are logged (kept while the journal needs them)."""
        return self.dir / f"{self.run_id}.model"


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        path.rmdir()


def write_json(path: Path, doc: dict) -> None:
    """Atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def load(path: str | Path) -> dict:
    """A journal as ``{"run_id", "uri", "experiment_id", "records": [...], "status"?}``, from either form.

    A ``.jsonl`` cut short by a killed process loses only its last, incomplete line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    lines = text.splitlines()
    doc = json.loads(lines[0]) if lines else {}
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed writer
            break
    return {**doc, "records": records}


def find(run_dir: str | Path, replayed: bool = False, exclude: Iterable[str] = ()) -> list[Path]:
    """The journals in ``run_dir`` (or the one file given), oldest first: pending ones, or already replayed ones."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [run_dir]
    folder = run_dir / DIR
    if not folder.is_dir():
        return []
    paths = [p for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and not p.name.endswith(".tmp")
             and p.name.endswith(".replayed.json") == replayed and p.name.split(".")[0] not in set(exclude)]
    return sorted(paths, key=lambda p: p.stat().st_mtime)


def replay_file(path: Path, uri: str | None = None, client=None) -> int:
    """Send one journal idempotently; returns how many records had to be sent. Renames it when done."""
    from .replay import Replay
    from .store import open_client

    doc = load(path)
    uri = uri or doc.get("uri")
    client = client or open_client(uri)
    sent = Replay(client, doc, base=path.parent).run()
    if not path.name.endswith(".replayed.json"):
        done = path.with_name(f"{doc['run_id']}.replayed.json")
        write_json(done, {**doc, "replayed_at": time.time()})
        path.unlink(missing_ok=True)
    return sent


def replay_dir(run_dir: str | Path, uri: str | None = None, exclude: Iterable[str] = (), client=None) -> int:
    """Replay every pending journal of ``run_dir``; returns how many were replayed (used on resume)."""
    paths = find(run_dir, exclude=exclude)
    for path in paths:
        sent = replay_file(path, uri, client)
        log.info("replayed the MLflow journal %s: %d record(s) sent", path, sent)
    return len(paths)


USAGE = f"""usage: {COMMAND} <run dir | journal file> [tracking_uri=URI]

Sends what a run could not send to MLflow (its journal in <run dir>/{DIR}/),
idempotently: records the run already holds are not sent again. Sets the
run's final status and the tag dpcnn.replayed. tracking_uri= overrides the
URI recorded in the journal (e.g. the server moved)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m dpcnn.tracking replay <run dir> [tracking_uri=...]``."""
    from .errors import DpcnnError
    from .store import why

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] != "replay" or len(args) < 2:
        print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    target, uri = Path(args[1]), None
    for a in args[2:]:
        if not a.startswith("tracking_uri="):
            print(f"error: unexpected argument {a!r}\n{USAGE}", file=sys.stderr)
            return 2
        uri = a.split("=", 1)[1]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = find(target) or find(target, replayed=True)
    if not paths:
        print(f"error: no MLflow journal in {target} (looked in {target / DIR})", file=sys.stderr)
        return 2
    try:
        for path in paths:
            sent = replay_file(path, uri)
            doc_run = path.name.split(".")[0]
            print(f"{path}: run {doc_run}: {sent} record(s) sent" if sent else
                  f"{path}: run {doc_run}: already complete in MLflow, nothing sent")
    except DpcnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the server went away again: one line, the journal is kept
        print(f"error: replay of {path} stopped ({why(e)}); the journal is kept, run the command again",
              file=sys.stderr)
        return 1
    return 0
