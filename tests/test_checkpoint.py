"""Checkpoints: atomic, pickle-free, verified on load, pruned to keep_last."""

import json
import os

import numpy as np
import pytest

from dpcnn import checkpoint
from dpcnn.checkpoint import Checkpoint
from dpcnn.errors import CheckpointError


def make(step, value=1.0):
    return Checkpoint(np.full(10, value, np.float32), {"velocity": np.zeros(10, np.float32)},
                      {"step": step, "epoch": 0, "config": "a: 1"})


def test_roundtrip(tmp_path):
    checkpoint.save(tmp_path, make(3, 2.5))
    ck = checkpoint.load(tmp_path / "last.npz")
    assert ck.step == 3 and ck.params.dtype == np.float32 and np.all(ck.params == 2.5)
    np.testing.assert_array_equal(ck.optimizer["velocity"], 0)
    assert ck.meta["config"] == "a: 1"
    assert checkpoint.load(tmp_path).step == 3  # a directory means its last.npz


def test_keep_last_and_last_points_to_newest(tmp_path):
    for s in range(1, 6):
        checkpoint.save(tmp_path, make(s, s), keep_last=2)
    assert [p.name for p in checkpoint.list_steps(tmp_path)] == ["step-00000004.npz", "step-00000005.npz"]
    assert checkpoint.load(tmp_path).step == 5
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    checkpoint.save(tmp_path, make(1))
    path = tmp_path / "step-00000001.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        # Change a parameter value inside the (uncompressed) zip without touching its structure.
        i = data.find(np.float32(1.0).tobytes() * 4)
        data[i:i + 4] = np.float32(7.0).tobytes()
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint" * 10)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_tampered_metadata_is_detected(tmp_path):
    checkpoint.save(tmp_path, make(1))
    path = tmp_path / "last.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["params"] = arrays["params"] * 2  # digests in meta no longer match
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        checkpoint.load(path)


def test_checkpoint_never_needs_pickle(tmp_path):
    checkpoint.save(tmp_path, make(1))
    with np.load(tmp_path / "last.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        json.loads(str(z["meta"]))


def test_unwritable_directory_keeps_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, make(1, 1.0))
    if os.geteuid() == 0:
        # root ignores permissions: make the target name an existing directory instead.
        (tmp_path / "step-00000002.npz").mkdir()
    else:
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            checkpoint.save(tmp_path, make(2, 2.0))
    finally:
        tmp_path.chmod(0o700)
    assert checkpoint.load(tmp_path).step == 1
    assert not list(tmp_path.glob(".tmp-*"))
