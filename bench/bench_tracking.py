"""What a hung tracking server costs training: wall time of runs whose server is SIGSTOPped mid-run.

    DPCNN_DATA_DIR=... python bench/bench_tracking.py [--epochs 60] [--stall 30] [--repeats 2]

Starts a real ``mlflow server`` on 127.0.0.1 (its own SQLite store in a temporary
folder), then runs ``mpirun -n 2 python -m dpcnn.train model=small`` against it,
alternating an undisturbed run and one whose server is SIGSTOPped for ``--stall``
seconds a few seconds into training (SIGCONT after). The figure is the training
loop's wall time (the last epoch's ``elapsed_s`` in the checkpoint: steps,
evaluations, checkpoints, everything), and the job's wall time; medians over the
repeats; and the time rank 0's training thread spent inside tracking calls (the
tag ``dpcnn.tracking.blocked_s``), which a busy host does not blur. Also checks
that every record of every run arrived.
Writes bench/tracking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, write_json  # noqa: F401 - ROOT on sys.path: dpcnn from this checkout

BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "ab")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.3)
    raise SystemExit("mlflow server did not start")


def one_run(root: Path, uri: str, name: str, epochs: int, stall: float, server: subprocess.Popen) -> dict:
    from mlflow.tracking import MlflowClient

    from dpcnn import checkpoint

    run_dir = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, "-m", "dpcnn.train", "model=small",
           f"trainer.epochs={epochs}", "trainer.progress=false", f"tracking.uri={uri}", f"tracking.experiment={name}",
           "tracking.plots=false", f"hydra.run.dir={run_dir}"]
    t0 = time.monotonic()
    job = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stall:
        log = run_dir / "train.log"
        while job.poll() is None and "epoch 2:" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGSTOP)
        time.sleep(stall)
        os.killpg(server.pid, signal.SIGCONT)
    err = job.communicate()[1]
    wall = time.monotonic() - t0
    if job.returncode != 0:
        raise SystemExit(f"{name}: exit {job.returncode}\n{err[-3000:]}")
    history = checkpoint.load(run_dir / "checkpoints").meta["history"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    points = len(client.get_metric_history(run.info.run_id, "train_loss_step"))
    models = client.search_logged_models([run.info.experiment_id])
    return {"name": name, "stall_s": stall, "training_s": history[-1]["elapsed_s"], "job_s": wall,
            "blocked_in_tracking_s": float(run.data.tags.get("dpcnn.tracking.blocked_s", "nan")),
            "status": run.info.status, "loss_points": points, "models_ready": sum(str(m.status) == "READY"
                                                                               for m in models),
            "worst_wall_img_s": min(h["wall_img_per_s"] for h in history),
            "median_step_img_s": statistics.median(h["img_per_s"] for h in history)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dpcnn-bench-tracking-") as tmp:
        root, port = Path(tmp), free_port()
        server = start_server(root, port)
        try:
            rows = []
            for i in range(args.repeats):
                for stall in (0.0, args.stall):
                    row = one_run(root, f"http://127.0.0.1:{port}", f"r{i}-stall{int(stall)}", args.epochs, stall,
                                  server)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            os.killpg(server.pid, signal.SIGCONT)
            os.killpg(server.pid, signal.SIGTERM)
    calm = statistics.median(r["training_s"] for r in rows if not r["stall_s"])
    hung = statistics.median(r["training_s"] for r in rows if r["stall_s"])
    summary = {"epochs": args.epochs, "stall_s": args.stall, "repeats": args.repeats, "undisturbed_training_s": calm,
               "stalled_training_s": hung, "growth_s": hung - calm,
               "max_blocked_in_tracking_s": max(r["blocked_in_tracking_s"] for r in rows),
               "complete": all(r["status"] == "FINISHED" and r["models_ready"] == 1 and
                               r["loss_points"] == rows[0]["loss_points"] for r in rows),
               "load_average_end": os.getloadavg(), "rows": rows}
    print(f"training wall time: undisturbed {calm:.1f} s, server hung {args.stall:.0f} s: {hung:.1f} s "
          f"(growth {hung - calm:+.1f} s); training thread blocked in tracking calls: at most "
          f"{summary['max_blocked_in_tracking_s'] * 1000:.0f} ms per run; every record arrived: {summary['complete']}")
    print(f"wrote {write_json('tracking.json', summary)}")


if __name__ == "__main__":
    main()
