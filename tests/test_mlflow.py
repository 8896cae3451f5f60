"""MLflow end to end: what a run records, the served model, the CLIs, a real tracking server and its outages.

One short 2-rank run (module fixture) is read back by several tests. The
tracking-server tests start a real ``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint
from dpcnn.data import load_dataset
from dpcnn.idx import read_idx
from dpcnn.serving import build_model, normalise, spec_from_config
from dpcnn.tracking_inputs import array_digest

from conftest import MNIST_5K, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi
BIN = Path(sys.executable).parent
QUIET = "trainer.progress=false"
TEST_IMAGES, TEST_LABELS = MNIST_5K / "t10k-images-idx3-ubyte.gz", MNIST_5K / "t10k-labels-idx1-ubyte.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def start_group(cmd, log: Path, **kw) -> subprocess.Popen:
    """A server in its own process group (it forks workers), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Signal the server's whole process group (workers included), then reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def checkpoint_predictions(run_dir: Path, x_test: np.ndarray) -> np.ndarray:
    """Labels the trained network gives to [0, 1] test images, rebuilt from the checkpoint alone."""
    import yaml

    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.npz")
    spec = spec_from_config(yaml.safe_load(ckpt.meta["config"]))
    return build_model(spec, ckpt.params).predict(normalise(x_test, spec))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One short real run (2 ranks, 2 epochs of 2,000 images) into a local SQLite store."""
    needs_data()
    wd = tmp_path_factory.mktemp("tracked")
    t0 = time.monotonic()
    proc = run_train(2, "model=tiny", "trainer.epochs=2", "trainer.log_every=5", "data.train_subset=2000",
                     "tracking.experiment=m", "tracking.register_as=dpcnn-test", "tracking.system_metrics=true",
                     "tracking.system_metrics_interval=0.2", f"hydra.run.dir={wd / 'run'}", QUIET, cwd=wd)
    check_ok(proc)
    print(f"tracked run: {time.monotonic() - t0:.1f} s")
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("m").experiment_id])
    x_test = read_idx(TEST_IMAGES)[..., None].astype(np.float32) / 255
    return SimpleNamespace(wd=wd, uri=uri, client=client, run=run, run_id=run.info.run_id, run_dir=wd / "run",
                           log=proc.stdout + proc.stderr, x_test=x_test, y_test=read_idx(TEST_LABELS).astype(int),
                           expected=checkpoint_predictions(wd / "run", x_test))


def test_run_records_params_metrics_datasets_and_plots(tracked):
    import matplotlib.image
    import mlflow

    client, run, rid = tracked.client, tracked.run, tracked.run_id
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.name"] == "tiny" and p["data.train_subset"] == "2000" and p["tracking.log_model"] == "True"
    # 2,000 images / 64 -> 32 steps per epoch, 64 in all; train loss every 5 steps, epoch metrics twice.
    assert [m.step for m in client.get_metric_history(rid, "train_loss_step")] == list(range(5, 65, 5))
    assert [m.step for m in client.get_metric_history(rid, "test_acc")] == [32, 64]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)

    # The datasets, exactly as trained on: name, content digest, source folder, context.
    data = load_dataset("mnist", MNIST_5K, train_subset=2000, download=False, progress=False)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-test"}
    assert inputs["mnist-train"].dataset.digest == array_digest(*data.train)
    assert inputs["mnist-test"].dataset.digest == array_digest(*data.test)
    assert json.loads(inputs["mnist-train"].dataset.source)["uri"] == str(MNIST_5K.resolve())
    assert {t.key: t.value for t in inputs["mnist-test"].tags}["mlflow.data.context"] == "testing"

    arts = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {"plots/learning_curves.png", "plots/confusion_matrix.png", "plots/filters_layer0.png",
            "plots/misclassified.png", "plots/per_class_metrics.csv", "plots/activations"} <= arts
    acts = [a.path for a in client.list_artifacts(rid, "plots/activations")]
    assert len(acts) == 4
    local = Path(client.download_artifacts(rid, "plots", str(tracked.wd / "dl")))
    for png in [*local.glob("*.png"), *local.glob("activations/*.png")]:
        img = matplotlib.image.imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 300 and img[..., :3].std() > 0.05, png

    # The per-class table agrees with the checkpoint's own predictions on the test set.
    mlflow.set_tracking_uri(tracked.uri)  # load_table searches runs through the global URI
    table = client.load_table(run.info.experiment_id, "per_class_metrics.json", run_ids=[rid])
    assert list(table["support"]) == list(np.bincount(tracked.y_test, minlength=10))
    recall = [np.mean(tracked.expected[tracked.y_test == c] == c) for c in range(10)]
    assert np.allclose(table["recall"], recall, atol=1e-4)


def test_logged_model_serves_the_checkpoints_predictions(tracked):
    import mlflow.pyfunc
    import yaml

    rid, client = tracked.run_id, tracked.client
    mlflow.set_tracking_uri(tracked.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{rid}/model")
    x = tracked.x_test[:500]
    out = model.predict(x)
    assert list(out.columns) == ["label"] + [f"prob_{i}" for i in range(10)]
    assert np.array_equal(out["label"].to_numpy(), tracked.expected[:500])
    assert np.allclose(out.filter(like="prob_").sum(axis=1), 1, atol=1e-5)
    # The PythonModel itself takes uint8 pixels, flat or not, and normalises them itself.
    raw = (x * 255).round().astype(np.uint8)
    inner = model.unwrap_python_model()
    assert np.array_equal(inner.predict(None, raw.reshape(500, 784))["label"], tracked.expected[:500])
    assert np.array_equal(inner.predict(None, raw[..., 0])["label"], tracked.expected[:500])

    # Nothing pickled; the spec and weights are plain files; the signature is the documented one.
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{rid}/model", dst_path=str(tracked.wd / "model")))
    assert not list(local.rglob("*.pkl")) and (local / "code" / "dpcnn" / "serving.py").is_file()
    spec = json.loads((local / "artifacts" / "spec.json").read_text())
    assert spec["mean"] == pytest.approx(0.1307) and spec["input_shape"] == [28, 28, 1]
    sig = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert json.loads(sig["inputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 28, 28, 1]}
    (version,) = client.search_model_versions("name='dpcnn-test'")
    assert version.run_id == rid and int(version.version) == 1


def test_mlflow_models_serve_answers_invocations(tracked):
    port = free_port()
    # `mlflow models serve` execs `uvicorn` from PATH, as in an activated virtualenv.
    env = train_env(MLFLOW_TRACKING_URI=tracked.uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    serve = start_group([str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{tracked.run_id}/model",
                         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                        tracked.wd / "serve.log", env=env, cwd=tracked.wd)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 90, serve)
        raw = (tracked.x_test[:64] * 255).round().astype(int)  # JSON integers 0-255: raw pixels
        body = json.dumps({"inputs": raw.tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.load(r)
        print(f"/invocations, 64 images: {1000 * (time.perf_counter() - t0):.0f} ms")
        labels = [row["label"] for row in answer["predictions"]]
        assert labels == tracked.expected[:64].tolist()
    finally:
        stop_group(serve)


def test_predict_and_viz_commands(tracked, tmp_path, monkeypatch, capsys):
    import matplotlib.image

    from dpcnn import predict, viz

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    # IDX images with labels, through the MLflow model.
    assert predict.main([f"model=runs:/{tracked.run_id}/model", f"images={TEST_IMAGES}", f"labels={TEST_LABELS}",
                         "limit=300"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 302  # header, 300 images, summary
    assert [int(line.split()[1]) for line in lines[1:301]] == tracked.expected[:300].tolist()
    acc = np.mean(tracked.expected[:300] == tracked.y_test[:300])
    assert lines[-1] == f"300 image(s); accuracy {acc:.2%}"
    # The pictures of the run, redrawn from its logged checkpoint.
    assert viz.main([f"run_id={tracked.run_id}", "images=2", "out=v"]) == 0
    assert f"test accuracy {np.mean(tracked.expected == tracked.y_test):.2%}" in capsys.readouterr().out
    assert len(list((tmp_path / "v" / "activations").glob("*.png"))) == 2
    assert matplotlib.image.imread(tmp_path / "v" / "confusion_matrix.png").shape[0] > 200
    # As a command: PNGs, one drawn black-on-white (inverted automatically), from the checkpoint (no MLflow).
    matplotlib.image.imsave(tmp_path / "a.png", tracked.x_test[0, ..., 0], cmap="gray", vmin=0, vmax=1)
    matplotlib.image.imsave(tmp_path / "b.png", 1 - tracked.x_test[1, ..., 0], cmap="gray", vmin=0, vmax=1)
    proc = subprocess.run([sys.executable, "-m", "dpcnn.predict", f"model={tracked.run_dir}/checkpoints/last.npz",
                           f"images={tmp_path}/*.png"], env=train_env(), capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    check_ok(proc)
    rows = proc.stdout.strip().splitlines()
    assert [int(r.split()[1]) for r in rows[1:3]] == tracked.expected[:2].tolist()
    assert "1 inverted" in rows[-1]


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    from dpcnn import predict, viz

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for main, args, message in (
            (predict.main, ["images=x.png"], "missing model="),
            (predict.main, ["model=nothing.npz", f"images={TEST_IMAGES}"], "nothing.npz: no such checkpoint"),
            (predict.main, ["model=m.npz", "images=none*.png"], "no file matches 'none*.png'"),
            (predict.main, ["model=runs:/abc/model", f"images={TEST_IMAGES}"], "no MLflow store at sqlite:///"),
            (viz.main, ["run_id=abc"], "no MLflow store at sqlite:///"),
            (viz.main, ["run_id=abc", "checkpoint=x.npz"], "exactly one of run_id=")):
        with pytest.raises(SystemExit) as e:  # anything else (a traceback) fails the test
            main(args)
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code)
    assert not (tmp_path / "mlflow.db").exists()  # looking for a run made no empty store


# ------------------------------------------------------------- a real tracking server

def start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start_group([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                        "--port", str(port), "--workers", "1"], root / "server.log", env=env, cwd=root)
    wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
    return proc


def test_unreachable_server_stops_before_training(workdir):
    needs_data()
    port = free_port()  # nothing listens there
    proc = run_train(2, "model=tiny", f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={workdir / 'run'}",
                     QUIET, cwd=workdir, timeout=120)
    assert proc.returncode != 0
    line = f"cannot reach the MLflow tracking store at http://127.0.0.1:{port} (connection refused)"
    assert line in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (workdir / "run" / "checkpoints").exists()  # no step was taken


def test_server_outage_mid_run_loses_no_training(workdir):
    """Kill the tracking server as soon as the run exists; restart it once training has noticed."""
    needs_data()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(workdir, port)
    run_dir, epochs, steps = workdir / "run", 2, 79  # 5,000 / 64 -> 79 steps per epoch
    train = subprocess.Popen(
        [str(BIN / "mpirun"), "-n", "2", sys.executable, "-m", "dpcnn.train", "model=small",
         f"trainer.epochs={epochs}", "trainer.log_every=10", f"tracking.uri={uri}", "tracking.experiment=outage",
         "tracking.retry_interval=1", "tracking.activation_images=1", f"hydra.run.dir={run_dir}", QUIET],
        env=train_env(), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train.log"
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and train.poll() is None:
            exp = client.get_experiment_by_name("outage")
            if exp and client.search_runs([exp.experiment_id]):
                break
            time.sleep(0.1)
        assert train.poll() is None, "training ended before its run appeared"
        stop_group(server, signal.SIGKILL)
        killed_at = time.time()
        while time.monotonic() < deadline and "training continues" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        server = start_server(workdir, port)
        restarted_at = time.time()
        out, err = train.communicate(timeout=180)
        assert train.returncode == 0, err[-3000:]
        text = log.read_text()
        assert "training continues" in text and "MLflow is reachable again" in text, text[-2000:]
        assert checkpoint.load(run_dir / "checkpoints").step == epochs * steps
        # Everything reached the restarted server, the metric points made while it was down included.
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss_step")
        assert [m.step for m in history] == list(range(10, epochs * steps + 1, 10))
        assert any(killed_at * 1000 < m.timestamp < restarted_at * 1000 for m in history), (killed_at, restarted_at)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [steps, 2 * steps]
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"mnist-train", "mnist-test"}
        assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.npz"]
        (model,) = client.search_logged_models([run.info.experiment_id])
        assert model.source_run_id == run.info.run_id and str(model.status) == "READY"
        assert not (run_dir / "mlflow_journal").exists()  # everything arrived: no journal left
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        stop_group(server)
