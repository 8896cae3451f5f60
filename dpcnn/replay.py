"""Sending journal records to MLflow: live (`send`, the tracker's worker) and idempotently (`Replay`).

A record is a plain JSON dict with an ``op`` (see `dpcnn.journal`):

====================  ==========================================================
``params``            ``{"params": {key: value}}``
``metrics``           ``{"metrics": [[key, value, timestamp ms, step], ...]}``
``tags``              ``{"tags": {key: value}}``
``artifact``          ``{"path": file, "artifact_path": dir or null}``
``artifacts``         ``{"dir": folder, "artifact_path": dir or null}``
``text``              ``{"text": ..., "name": file}``
``table``             ``{"data": {column: [values]}, "artifact_file": file}``
``inputs``            ``{"datasets": [{name, digest, source_type, source, schema, profile, tags}]}``
``model``             ``{"name", "dir" (weights.npz, spec.json), "example", "step", "registered_model_name"}``
``end``               ``{"status": FINISHED|FAILED|KILLED, "end_time": ms}``
====================  ==========================================================

Every op can be sent twice without a second anything: MLflow keeps one copy
of a metric point with the same key, step, timestamp and value, of a param or
tag, of a dataset input and of an artifact path; a table is only written if
it is absent (MLflow would append); the model is looked up first
(`log_model_once`) and a half-logged one is finished rather than duplicated.
`Replay` also skips what the run already holds, so a second replay sends nothing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REPLAYED_TAG = "dpcnn.replayed"


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def send(client, run_id: str, experiment_id: str, rec: dict, base: Path) -> None:
    """Send one record to run ``run_id`` (``base``: the journal folder, for the model's files)."""
    from mlflow.entities import Metric, Param, RunTag

    op = rec["op"]
    if op == "params":
        for chunk in _batches([Param(k, str(v)) for k, v in rec["params"].items()], 100):
            client.log_batch(run_id, params=chunk)
    elif op == "metrics":
        for chunk in _batches([Metric(k, float(v), int(t), int(s)) for k, v, t, s in rec["metrics"]], 1000):
            client.log_batch(run_id, metrics=chunk)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
    elif op == "artifacts":
        client.log_artifacts(run_id, rec["dir"], rec.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, rec["text"], rec["name"])
    elif op == "table":
        if not _artifact_sizes(client, run_id, rec["artifact_file"]).get(rec["artifact_file"]):
            client.log_table(run_id, data=rec["data"], artifact_file=rec["artifact_file"])
    elif op == "inputs":
        client.log_inputs(run_id, datasets=[_dataset_input(d) for d in rec["datasets"]])
    elif op == "model":
        log_model_once(client, run_id, experiment_id, rec, base)
    elif op == "end":
        client.set_terminated(run_id, rec["status"], end_time=rec.get("end_time"))
    else:
        raise ValueError(f"unknown journal op {op!r}")


def dataset_record(dataset_input) -> dict:
    """An MLflow ``DatasetInput`` as a plain dict (what the journal stores)."""
    d = dataset_input.dataset
    return {"name": d.name, "digest": d.digest, "source_type": d.source_type, "source": d.source,
            "schema": d.schema, "profile": d.profile, "tags": {t.key: t.value for t in dataset_input.tags}}


def _dataset_input(d: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(dataset=Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                        d.get("profile")),
                        tags=[InputTag(key=k, value=v) for k, v in d.get("tags", {}).items()])


def _artifact_sizes(client, run_id: str, path: str) -> dict[str, int]:
    """{artifact path: size} of the files in ``path``'s folder."""
    folder = str(Path(path).parent) if "/" in path else None
    return {f.path: f.file_size or 0 for f in client.list_artifacts(run_id, folder) if not f.is_dir}


def _models(client, run_id: str, experiment_id: str, name: str) -> list:
    return [m for m in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
            if m.name == name]


def log_model_once(client, run_id: str, experiment_id: str, rec: dict, base: Path) -> bool:
    """Log the model of a ``model`` record unless the run has it READY; returns whether it was logged.

    A model left PENDING or FAILED by an attempt cut short is finished (same model id) rather
    than duplicated; other unfinished ones of this run and name are deleted. A registered
    model version is created only if none of this run exists.
    """
    from .serving import log_pyfunc  # imports mlflow.pyfunc

    name = rec.get("name", "model")
    found = _models(client, run_id, experiment_id, name)
    if any(str(m.status) == "READY" for m in found):
        return False
    # PENDING (the attempt was cut off) or FAILED (MLflow marked it so on an error): finish that one.
    reuse = next((m.model_id for m in found), None)
    register = rec.get("registered_model_name")
    if register and client.search_model_versions(f"name = '{register}' and run_id = '{run_id}'"):
        register = None
    folder = base / rec["dir"]
    with np.load(folder / "weights.npz", allow_pickle=False) as z:
        params = z["params"]
    spec = __import__("json").loads((folder / "spec.json").read_text())
    info = log_pyfunc(run_id, experiment_id, params, spec, np.asarray(rec["example"], np.float32), name=name,
                      registered_model_name=register, step=int(rec.get("step", 0)),
                      tracking_uri=client.tracking_uri, model_id=reuse)
    for m in _models(client, run_id, experiment_id, name):
        if m.model_id != info.model_id and str(m.status) != "READY":
            try:
                client.delete_logged_model(m.model_id)
            except Exception as e:  # noqa: BLE001 - a leftover is not worth failing the run
                log.warning("could not delete the unfinished model %s: %s", m.model_id, e)
    return True


class Replay:
    """Send what a run does not hold yet, in journal order; then its final status and `REPLAYED_TAG`."""

    def __init__(self, client, doc: dict, base: Path):
        self.client, self.doc, self.base = client, doc, base
        self.run_id, self.experiment_id = doc["run_id"], doc.get("experiment_id")
        run = client.get_run(self.run_id)
        self.experiment_id = self.experiment_id or run.info.experiment_id
        self.status = run.info.status
        self.params, self.tags = dict(run.data.params), dict(run.data.tags)
        self.inputs = {(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])}
        self._history: dict[str, set] = {}
        self._listings: dict[str | None, dict[str, int]] = {}

    def run(self) -> int:
        """Returns the number of records that had to be sent (0: the run was already complete)."""
        sent, end = 0, None
        for rec in self.doc["records"]:
            if rec["op"] == "end":
                end = rec
                continue
            if rec["op"] == "model":  # looks for a READY model itself
                sent += log_model_once(self.client, self.run_id, self.experiment_id, rec, self.base)
            elif self._missing(rec):
                sent += self._send(rec)
        if end is None:  # the job died without ending its run (kill -9, a lost node)
            end = {"op": "end", "status": "FAILED", "end_time": None}
            self.doc.setdefault("records", []).append(end)
            if self.tags.get("dpcnn.failure") is None:
                self.client.set_tag(self.run_id, "dpcnn.failure", "the job ended without closing its run (killed)")
                sent += 1
        if sent or self.status != end["status"]:
            self.client.set_tag(self.run_id, REPLAYED_TAG, "true")
            send(self.client, self.run_id, self.experiment_id, end, self.base)
            sent += 1
        return sent

    def _send(self, rec: dict) -> int:
        """Send ``rec``: 1; a record MLflow refuses (as it did live, e.g. a changed param) is skipped: 0."""
        from .store import transient, why

        try:
            send(self.client, self.run_id, self.experiment_id, rec, self.base)
            return 1
        except Exception as e:
            if transient(e):
                raise
            log.warning("MLflow refuses the journal's %s record %s (%s); skipped", rec["op"], rec.get("seq"), why(e))
            return 0

    def _missing(self, rec: dict) -> bool:
        """Whether ``rec`` holds anything the run lacks; trims it to the missing part."""
        op = rec["op"]
        if op in ("params", "tags"):  # MLflow keeps the first 6,000 / 8,000 characters of a longer value
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

            have, limit = (self.params, MAX_PARAM_VAL_LENGTH) if op == "params" else (self.tags, MAX_TAG_VAL_LENGTH)
            rec[op] = {k: v for k, v in rec[op].items() if have.get(k) != str(v)[:limit]}
            have.update({k: str(v)[:limit] for k, v in rec[op].items()})
            return bool(rec[op])
        if op == "metrics":
            rec["metrics"] = [m for m in rec["metrics"] if _point(m) not in self._points(m[0])]
            for m in rec["metrics"]:
                self._points(m[0]).add(_point(m))
            return bool(rec["metrics"])
        if op == "inputs":
            return any((d["name"], d["digest"]) not in self.inputs for d in rec["datasets"])
        if op in ("artifact", "text", "table"):
            where = {"artifact": lambda: _join(rec.get("artifact_path"), Path(rec["path"]).name),
                     "text": lambda: rec["name"], "table": lambda: rec["artifact_file"]}[op]()
            size = {"artifact": lambda: Path(rec["path"]).stat().st_size,
                    "text": lambda: len(rec["text"].encode("utf-8")), "table": lambda: None}[op]()
            have = self._sizes(where).get(where)
            return have is None or (size is not None and have != size)
        if op == "artifacts":
            return self._missing_files(Path(rec["dir"]), rec.get("artifact_path"))
        raise ValueError(f"unknown journal op {op!r}")

    def _missing_files(self, local: Path, artifact_path: str | None) -> bool:
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            where = _join(artifact_path, f.relative_to(local).as_posix())
            if self._sizes(where).get(where) != f.stat().st_size:
                return True
        return False

    def _points(self, key: str) -> set:
        if key not in self._history:
            self._history[key] = {_point((key, m.value, m.timestamp, m.step))
                                  for m in self.client.get_metric_history(self.run_id, key)}
        return self._history[key]

    def _sizes(self, path: str) -> dict[str, int]:
        folder = str(Path(path).parent) if "/" in path else None
        if folder not in self._listings:
            self._listings[folder] = _artifact_sizes(self.client, self.run_id, path)
        return self._listings[folder]


def _point(m) -> tuple:
    key, value, timestamp, step = m
    value = float(value)
    return key, "nan" if math.isnan(value) else value, int(timestamp), int(step)


def _join(folder: str | None, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name
