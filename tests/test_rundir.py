"""The run-directory lock under contention: jobs that start at the same moment."""

import json
import multiprocessing as mp
import os
import socket
import subprocess

import pytest

from dpcnn.errors import ConfigError
from dpcnn.rundir import RunDirLock


def _contend(run_dir, barrier, results):
    barrier.wait()
    try:
        lock = RunDirLock(run_dir).acquire()
    except ConfigError as e:
        results.put(("refused", str(e)))
        barrier.wait()  # hold on until every contender has tried
        return
    results.put(("owner", os.getpid()))
    barrier.wait()
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "over-a-dead-owner"])
def test_of_jobs_starting_together_exactly_one_owns_the_run_dir_and_the_rest_name_it(tmp_path, stale):
    ctx = mp.get_context("fork")
    n = 6
    dead = subprocess.Popen(["true"])
    dead.wait()
    for attempt in range(15):
        run_dir = tmp_path / f"run{attempt}"
        if stale:  # a job killed with -9 left its lock; all contenders find it dead at once
            run_dir.mkdir()
            (run_dir / ".dpcnn.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(run_dir, barrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(timeout=30)
        owners = [v for k, v in got if k == "owner"]
        assert len(owners) == 1, got
        for kind, msg in got:
            if kind == "refused":
                assert f"is in use by pid {owners[0]} on host {socket.gethostname()}" in msg, msg
        assert not (run_dir / ".dpcnn.lock").exists()


def test_the_lock_file_holds_its_owner_from_the_moment_it_exists(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    try:
        owner = json.loads((tmp_path / ".dpcnn.lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert [p.name for p in tmp_path.iterdir()] == [".dpcnn.lock"]  # no temporary left beside it
    finally:
        lock.release()


def test_a_filesystem_without_hard_links_is_a_one_line_config_error(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(ConfigError, match="put hydra.run.dir on a filesystem with hard links"):
        RunDirLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []
