"""Regenerate the MLflow UI screenshots in docs/: ``python docs/screenshots.py`` (about a minute).

Trains two short runs of ``small`` (learning rates 0.05 and 0.01, 2 ranks) in a
temporary folder, starts ``mlflow ui`` on it, and drives headless Chromium
(Debian's ``chromium`` package: ``apt-get install chromium``) over the DevTools
protocol: close the assistant side panel, switch the UI to "Model training",
wait for the charts, capture PNGs. Standard library only (a minimal WebSocket
client is below), so it needs nothing beyond dpcnn's environment.

Needs the MNIST files (``DPCNN_DATA_DIR``) and ``mpirun`` next to the Python
running this script.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ a tiny WebSocket client (RFC 6455)

class WebSocket:
    def __init__(self, url: str):
        assert url.startswith("ws://")
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x81])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16
                                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            if b0 & 0x0F in (0x9, 0xA):  # ping/pong: ignore
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws_url: str):
        self.ws, self.next_id = WebSocket(ws_url), 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def goto(self, url: str, settle: float = 4.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)

    def wait_for(self, expression: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(expression):
                return True
            time.sleep(0.5)
        return False

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


# ------------------------------------------------------------------ the scenes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer")


def train_runs(work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for lr in ("0.05", "0.01"):
        subprocess.run([str(BIN / "mpirun"), "-n", "2", sys.executable, "-m", "dpcnn.train", "model=small",
                        "trainer.epochs=5", f"optimizer.lr={lr}", "trainer.progress=false",
                        "tracking.system_metrics=true", "tracking.system_metrics_interval=1",
                        "tracking.register_as=dpcnn-mnist", f"tracking.run_name=small-lr{lr}"],
                       cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)


CLOSE_ASSISTANT = """(() => {
  const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click();
  return !!b;
})()"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default: docs/)")
    ap.add_argument("--work", type=Path, help="an existing folder with mlflow.db from dpcnn runs (skips training)")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found; apt-get install chromium")
    work = args.work or Path(tempfile.mkdtemp(prefix="dpcnn-shots-"))
    if not args.work:
        train_runs(work)
    sys.path.insert(0, str(HERE.parent))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpcnn")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    run_id = runs.get("small-lr0.05") or next(iter(runs.values()))
    port = free_port()
    ui = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=work,
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    profile = Path(tempfile.mkdtemp(prefix="dpcnn-chromium-"))
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                    "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900",
                                    "--remote-debugging-port=0", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        devtools = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list"))
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        view = "?workflowType=machine_learning"  # the UI's "Model training" mode, not GenAI
        page.goto(f"{base}/runs/{run_id}{view}")
        page.js(CLOSE_ASSISTANT)  # it opens itself on a first visit; closing is remembered
        page.goto(f"{base}/runs/{run_id}{view}", settle=5)
        page.js(CLOSE_ASSISTANT)
        time.sleep(1)
        page.screenshot(args.out / "mlflow-run.png")
        page.goto(f"{base}/runs/{run_id}/model-metrics{view}", settle=3)
        page.wait_for("document.querySelectorAll('.js-plotly-plot, canvas, svg.main-svg').length >= 4", 30)
        time.sleep(3)
        page.screenshot(args.out / "mlflow-metrics.png")
        page.goto(f"{base}/runs/{run_id}/artifacts/plots/activations/test_00000.png{view}", settle=6)
        page.screenshot(args.out / "mlflow-artifacts.png")
        page.goto(f"{base}/runs{view}&compareRunsMode=CHART", settle=2)
        page.call("Page.reload")  # a hash change alone keeps the run page mounted
        time.sleep(4)
        page.wait_for("document.querySelectorAll('.js-plotly-plot, svg.main-svg').length >= 4", 30)
        time.sleep(8)
        page.screenshot(args.out / "mlflow-compare.png")
    finally:
        if browser is not None:
            browser.terminate()
            browser.wait()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
