"""The downloader against a real local HTTP server: fallback between mirrors, no partial files."""

import hashlib
import os
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from dpcnn.data import DATASETS, load_dataset
from dpcnn.errors import DataError
from dpcnn.idx import DatasetSpec, ensure_files

SHARED = Path(os.environ.get("DPCNN_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
MNIST5K = SHARED / "mnist-5k"
pytestmark = pytest.mark.skipif(not MNIST5K.is_dir(), reason=f"{MNIST5K} absent (set DPCNN_SHARED_DATA)")

# .gz md5 of the mnist-5k files, from ../shared/data/README.md.
MD5_5K = {"train-images-idx3-ubyte.gz": "86cdf6704dadc654e231abcefb0fb4cf",
          "train-labels-idx1-ubyte.gz": "375e5ffeab42a5d13d81367316fe221c",
          "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
          "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
FILES = DATASETS["mnist"].files


class Handler(BaseHTTPRequestHandler):
    """Routes /<mode>/<file name>: good, corrupt (bytes flipped), hangup (dies mid-body),
    stall (sends half, then sleeps), missing (404)."""

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        self.server.hits[mode] += 1
        source = self.server.files / name
        if mode == "missing" or not source.is_file():
            self.send_error(404)
            return
        data = source.read_bytes()
        if mode == "corrupt":
            data = bytes(b ^ 0x55 for b in data[:64]) + data[64:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode in ("hangup", "stall"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if mode == "stall":
                time.sleep(3)
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = tmp_path_factory.mktemp("served")
    for name in FILES.values():
        shutil.copy(MNIST5K / name, files / name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.hits = files, Counter()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def spec_with(*mirrors) -> DatasetSpec:
    return DatasetSpec(name="mnist", files=dict(FILES), md5=dict(MD5_5K), mirrors=tuple(mirrors),
                       mean=0.1307, std=0.3081)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_complete(root: Path):
    assert leftovers(root) == sorted(f"mnist/{n}" for n in FILES.values())  # no temp files either
    for name in FILES.values():
        assert hashlib.md5((root / "mnist" / name).read_bytes()).hexdigest() == MD5_5K[name]


def test_download_from_a_good_mirror(server, tmp_path):
    httpd, url = server
    before = httpd.hits["good"]
    paths = ensure_files(spec_with(f"{url}/good/"), tmp_path, progress=False)
    assert set(paths) == set(FILES) and httpd.hits["good"] - before == 4
    assert_complete(tmp_path)
    splits = load_dataset(spec_with(), tmp_path, download=False)  # and it loads
    assert splits.train[0].shape == (5000, 28, 28, 1) and len(splits.test[1]) == 10000
    ensure_files(spec_with(f"{url}/good/"), tmp_path, progress=False)  # already there: no new requests
    assert httpd.hits["good"] - before == 4


@pytest.mark.parametrize("bad", ["corrupt", "hangup", "missing", "stall"])
def test_falls_back_to_the_next_mirror(server, tmp_path, bad):
    httpd, url = server
    before = httpd.hits[bad]
    ensure_files(spec_with(f"{url}/{bad}/", f"{url}/good/"), tmp_path, progress=False, timeout=0.5)
    assert httpd.hits[bad] - before == 4  # the bad mirror really was tried for every file
    assert_complete(tmp_path)


def test_all_mirrors_bad_leaves_nothing_behind(server, tmp_path):
    _, url = server
    with pytest.raises(DataError) as err:
        ensure_files(spec_with(f"{url}/corrupt/", f"{url}/hangup/", f"{url}/missing/"), tmp_path,
                     progress=False)
    message = str(err.value)
    assert "\n" not in message and "DPCNN_DATA_DIR" in message
    for name in FILES.values():
        assert name in message
    assert "md5" in message and "connection closed after" in message and "404" in message
    assert leftovers(tmp_path) == []


def test_no_network_names_the_missing_files(tmp_path):
    dead = closed_port_url()
    with pytest.raises(DataError) as err:
        ensure_files(spec_with(dead), tmp_path / "root", progress=False, timeout=2)
    message = str(err.value)
    assert "\n" not in message
    for name in FILES.values():
        assert name in message
    assert message.count(dead) == 1  # an unreachable mirror is reported, and tried, once
    assert str(tmp_path / "root" / "mnist") in message and "DPCNN_DATA_DIR" in message
    assert leftovers(tmp_path) == [] and not (tmp_path / "root" / "mnist").exists()


def test_only_missing_files_are_downloaded(server, tmp_path):
    httpd, url = server
    (tmp_path / "mnist").mkdir()
    keep = tmp_path / "mnist" / FILES["train_images"]
    shutil.copy(MNIST5K / FILES["train_images"], keep)
    before = httpd.hits["good"]
    paths = ensure_files(spec_with(f"{url}/good/"), tmp_path, progress=False)
    assert httpd.hits["good"] - before == 3 and paths["train_images"] == keep
    assert_complete(tmp_path)
    np.testing.assert_array_equal(load_dataset(spec_with(), tmp_path, download=False).train[1][:3],
                                  load_dataset(spec_with(), MNIST5K, download=False).train[1][:3])


def test_short_body_is_caught_even_without_a_checksum(server, tmp_path):
    # With no md5 to compare, only the Content-Length check notices the server hung up.
    _, url = server
    spec = DatasetSpec(name="mnist", files=dict(FILES), mirrors=(f"{url}/hangup/", f"{url}/good/"))
    ensure_files(spec, tmp_path, progress=False)
    assert_complete(tmp_path)
