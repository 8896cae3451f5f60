"""dpcnn.idx and dpcnn.data: IDX reading, the real datasets in ../shared/data, loading, sampler, augmentation."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from dpcnn.data import (DATASETS, EpochSampler, get_spec, load_data, load_dataset, random_shift, shift_offsets,
                        split_indices)
from dpcnn.errors import DataError
from dpcnn.idx import FILE_KEYS, ensure_files, find_files, read_idx, resolve_root

SHARED = Path(os.environ.get("DPCNN_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _needs(folder: str):
    return pytest.mark.skipif(not (SHARED / folder).is_dir(),
                              reason=f"{SHARED / folder} absent (set DPCNN_SHARED_DATA to the shared data folder)")


needs_mnist5k, needs_fashion = _needs("mnist-5k"), _needs("fashion-mnist")

# From ../shared/data/README.md: md5 of the decompressed bytes.
RAW_MD5 = {
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    "fashion-mnist/train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "mnist-5k/t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "mnist-5k/t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    "mnist-5k/train-images-idx3-ubyte.gz": "73875c53fd189a3d1f5d248b72d87772",
    "mnist-5k/train-labels-idx1-ubyte.gz": "742de12842fbb3090203268496d2ccae",
}


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Serialise an array as IDX (big-endian values)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dtype=dtype).tobytes()


def write_dataset(folder: Path, n_train=20, n_test=10, seed=0) -> dict:
    """A tiny synthetic MNIST-layout dataset (gzipped) in ``folder``; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": np.arange(n_test, dtype=np.uint8) % 10}
    for key, array in arrays.items():
        (folder / DATASETS["mnist"].files[key]).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------ real datasets

@needs_mnist5k
def test_mnist5k_counts_shapes_dtypes_and_balance():
    splits = load_dataset({"name": "mnist"}, root=resolve_root(SHARED / "mnist-5k"), download=False)
    (x, y), (xt, yt) = splits.train, splits.test
    assert x.shape == (5000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
    assert y.shape == (5000,) and yt.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 500))
    assert yt.min() == 0 and yt.max() == 9 and splits.val is None
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1  # normalised with the full-MNIST statistics


@needs_fashion
def test_fashion_mnist_found_under_dashed_folder_name():
    found, missing = find_files(DATASETS["fashion_mnist"], SHARED)
    assert missing == [] and all(p.parent.name == "fashion-mnist" for p in found.values())
    splits = load_dataset({"name": "fashion_mnist"}, root=SHARED, download=False)
    (x, y), (xt, yt) = splits.train, splits.test
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert y.shape == (60000,) and yt.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))  # Fashion-MNIST is balanced
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01  # its own mean/std: exactly standardised
    assert np.isclose(x.min(), splits.background)  # a 0 pixel maps to -mean/std


@pytest.mark.parametrize("rel", sorted(RAW_MD5))
def test_read_idx_returns_exactly_the_decompressed_payload(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} absent (set DPCNN_SHARED_DATA)")
    array = read_idx(path)
    assert array.dtype == np.uint8 and array.ndim == (3 if "images" in rel else 1)
    assert hashlib.md5(idx_bytes(array)).hexdigest() == RAW_MD5[rel]


@needs_mnist5k
def test_normalize_false_gives_unit_range():
    x = load_dataset({"name": "mnist"}, root=SHARED / "mnist-5k", download=False, normalize=False).train[0]
    assert x.min() == 0.0 and x.max() == 1.0


@needs_fashion
def test_verify_checksum_accepts_a_recompressed_copy_by_its_decompressed_md5():
    # The shared copy is Debian's repack: its .gz md5 differs from Zalando's, its content does not.
    ensure_files(DATASETS["fashion_mnist"], SHARED, download=False, verify_checksum=True)


@needs_mnist5k
def test_verify_checksum_passes_with_the_right_md5s():
    md5 = {"train-images-idx3-ubyte.gz": "86cdf6704dadc654e231abcefb0fb4cf",  # README, .gz column
           "train-labels-idx1-ubyte.gz": "375e5ffeab42a5d13d81367316fe221c",
           "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
           "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
    spec = get_spec({"name": "mnist", "md5": md5, "raw_md5": {}})
    assert set(ensure_files(spec, SHARED / "mnist-5k", download=False, verify_checksum=True)) == set(FILE_KEYS)


@needs_mnist5k
def test_verify_checksum_mismatch_names_file_and_both_md5s():
    # mnist-5k's training files are a subset, so the official checksums must reject them.
    with pytest.raises(DataError) as err:
        ensure_files(DATASETS["mnist"], SHARED / "mnist-5k", download=False, verify_checksum=True)
    assert_one_line(err, "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "86cdf6704dadc654e231abcefb0fb4cf")


# ------------------------------------------------------------------ bad files

def test_read_idx_roundtrip_raw_and_gz_by_magic_not_name(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a.gz").write_bytes(idx_bytes(array, 0x0C))  # raw despite the name
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(array, 0x0C)))  # gzip without the name
    for name in ("a.gz", "b"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.int32 and got.dtype.isnative
        np.testing.assert_array_equal(got, array)


GOOD = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))
BAD_FILES = {
    "truncated gzip": (gzip.compress(GOOD)[:-40], "gzip"),
    "raw cut in the middle": (GOOD[: len(GOOD) // 2], "truncated"),
    "gz cut in the middle": (gzip.compress(GOOD[: len(GOOD) // 2]), "truncated"),
    "header cut": (GOOD[:9], "truncated"),
    "wrong magic": (b"\x01\x02" + GOOD[2:], "not an IDX file"),
    "wrong dtype code": (GOOD[:2] + b"\x07" + GOOD[3:], "type code 0x07"),
    "zero dims": (b"\x00\x00\x08\x00", "0 dimensions"),
    "five dims": (b"\x00\x00\x08\x05" + b"\x00\x00\x00\x01" * 5 + b"\x00", "5 dimensions"),
    "trailing bytes": (GOOD + b"\x00" * 7, "7 trailing bytes"),
    "empty": (b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_idx_file_raises_one_line_data_error_naming_the_file(tmp_path, case):
    content, what = BAD_FILES[case]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert_one_line(err, str(path), what, "DPCNN_DATA_DIR")


def test_directory_where_a_file_should_be(tmp_path):
    write_dataset(tmp_path / "mnist")
    target = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    target.unlink()
    target.mkdir()
    with pytest.raises(DataError) as err:
        read_idx(target)
    assert_one_line(err, str(target), "directory")
    for verify in (False, True):
        with pytest.raises(DataError) as err:  # found, not "downloaded" over it
            load_dataset({"name": "mnist"}, root=tmp_path, download=True, verify_checksum=verify)
        assert_one_line(err, str(target), "directory")


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as err:
        read_idx(tmp_path / "nope")
    assert_one_line(err, str(tmp_path / "nope"), "no such file")


@pytest.mark.parametrize("key,array,what", [
    ("train_labels", np.zeros(19, np.uint8), "19 labels for 20 images"),
    ("train_labels", np.r_[np.zeros(19, np.uint8), 10], "label 10 outside 0..9"),
    ("test_labels", np.r_[np.zeros(9, np.uint8), 255], "label 255 outside 0..9"),
    ("train_images", np.zeros((20, 28), np.uint8), "expected uint8 images"),
    ("train_labels", np.zeros((20, 1), np.uint8), "1-D integer label file"),
])
def test_inconsistent_dataset_names_the_file(tmp_path, key, array, what):
    write_dataset(tmp_path / "mnist")
    path = tmp_path / "mnist" / DATASETS["mnist"].files[key]
    path.write_bytes(gzip.compress(idx_bytes(array)))
    with pytest.raises(DataError) as err:
        load_dataset({"name": "mnist"}, root=tmp_path, download=False)
    assert_one_line(err, str(path), what)


def test_missing_files_offline_message_lists_files_dirs_and_fix(tmp_path):
    write_dataset(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset({"name": "mnist"}, root=tmp_path, download=False)
    message = assert_one_line(err, "t10k-labels-idx1-ubyte.gz", str(tmp_path / "mnist"), str(tmp_path) + ";",
                              "DPCNN_DATA_DIR=")
    assert "train-images" not in message  # only what is actually missing


def test_ungzipped_files_are_found_too(tmp_path):
    arrays = write_dataset(tmp_path)  # directly in the root
    for name in DATASETS["mnist"].files.values():
        path = tmp_path / name
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    splits = load_dataset({"name": "mnist"}, root=tmp_path, download=False, normalize=False)
    np.testing.assert_array_equal(splits.test[1], arrays["test_labels"])
    np.testing.assert_array_equal(splits.train[0][..., 0], arrays["train_images"] / np.float32(255))


# ------------------------------------------------------------------ config and root

def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DPCNN_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root(None) == resolve_root("") == tmp_path / "env"
    monkeypatch.delenv("DPCNN_DATA_DIR")
    assert resolve_root() == tmp_path / "xdg" / "dpcnn"


def test_get_spec_overrides_and_new_datasets():
    spec = get_spec({"name": "mnist", "mean": 0.5, "std": None})
    assert spec.mean == 0.5 and spec.std == DATASETS["mnist"].std and spec.md5 == DATASETS["mnist"].md5
    assert get_spec({"name": "fashion-mnist"}) == DATASETS["fashion_mnist"]
    files = {k: f"kmnist-{k}.gz" for k in FILE_KEYS}
    new = get_spec({"name": "kmnist", "files": files, "mirrors": "http://example.invalid/"})
    assert new.files == files and new.mirrors == ("http://example.invalid/",) and new.md5 == {}
    with pytest.raises(DataError) as err:
        get_spec({"name": "x"})
    assert str(err.value) == ("unknown dataset 'x' (known: mnist, fashion_mnist, cifar10, npz, image_folder); "
                              "fix data.name or give data.files/data.mirrors for a new dataset")


def test_load_data_reads_hydra_config(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    write_dataset(tmp_path / "mnist", n_train=40)
    cfg = omegaconf.OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "mnist.yaml")
    cfg.root, cfg.train_subset, cfg.val_fraction = str(tmp_path), 30, 0.2
    splits = load_data(cfg)
    assert len(splits.train[1]) == 24 and len(splits.val[1]) == 6 and len(splits.test[1]) == 10
    assert splits.spec == DATASETS["mnist"]


def test_new_dataset_defined_by_config_only(tmp_path):
    files = {k: f"mine-{k}.idx" for k in FILE_KEYS}
    arrays = write_dataset(tmp_path / "mine")
    for key, name in DATASETS["mnist"].files.items():
        (tmp_path / "mine" / name).rename(tmp_path / "mine" / files[key])
    splits = load_dataset({"name": "mine", "files": files, "num_classes": 10}, root=tmp_path, download=False,
                          normalize=False)
    np.testing.assert_array_equal(splits.train[1], arrays["train_labels"])


# ------------------------------------------------------------------ subsets and validation split

def test_split_indices_deterministic_disjoint_and_complete():
    train, val = split_indices(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    np.testing.assert_array_equal(np.sort(np.r_[train, val]), np.arange(1000))
    again = split_indices(1000, 0.1, seed=3)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(1000, 0.1, seed=4)[1])
    assert len(split_indices(10, 0.0)[1]) == 0
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        split_indices(10, 1.0)


def test_train_subset_and_val_fraction_carve_the_first_examples(tmp_path):
    arrays = write_dataset(tmp_path / "mnist", n_train=50)
    kw = dict(root=tmp_path, download=False, normalize=False)
    full = load_dataset({"name": "mnist"}, **kw).train
    sub = load_dataset({"name": "mnist"}, train_subset=30, **kw).train
    np.testing.assert_array_equal(sub[0], full[0][:30])
    split = load_dataset({"name": "mnist"}, train_subset=30, val_fraction=0.2, val_seed=7, **kw)
    train_idx, val_idx = split_indices(30, 0.2, 7)
    np.testing.assert_array_equal(split.train[1], arrays["train_labels"][train_idx])
    np.testing.assert_array_equal(split.val[0], sub[0][val_idx])
    assert len(set(train_idx) & set(val_idx)) == 0 and len(val_idx) == 6
    again = load_dataset({"name": "mnist"}, train_subset=30, val_fraction=0.2, val_seed=7, **kw)
    np.testing.assert_array_equal(again.val[0], split.val[0])


# ------------------------------------------------------------------ sampler

@pytest.mark.parametrize("n,batch_size", [(64, 8), (67, 8), (10, 3), (5, 16), (16, 16)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_sampler_each_example_once_per_epoch_for_any_world_size(n, batch_size, world_size):
    sampler = EpochSampler(n, batch_size, seed=11)
    assert sampler.num_batches == -(-n // batch_size)
    seen = []
    for k in range(sampler.num_batches):
        parts = [dict((kk, (g, idx)) for kk, g, idx in sampler.local_batches(2, r, world_size))[k]
                 for r in range(world_size)]
        global_batch = sampler.batch(2, k)
        assert all(g == len(global_batch) for g, _ in parts)
        # Rank shards concatenated in rank order give the global batch: same order for any world size.
        np.testing.assert_array_equal(np.concatenate([idx for _, idx in parts]), global_batch)
        sizes = [len(idx) for _, idx in parts]
        assert max(sizes) - min(sizes) <= 1
        seen.append(global_batch)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


@pytest.mark.parametrize("n,batch_size", [(67, 8), (64, 8), (5, 16)])
def test_drop_last_drops_only_the_tail(n, batch_size):
    sampler = EpochSampler(n, batch_size, seed=1, drop_last=True)
    assert sampler.num_batches == n // batch_size
    batches = [sampler.batch(0, k) for k in range(sampler.num_batches)]
    assert all(len(b) == batch_size for b in batches)
    covered = np.concatenate(batches) if batches else np.array([], int)
    np.testing.assert_array_equal(covered, sampler.permutation(0)[: len(covered)])
    assert len(covered) == n - n % batch_size


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(100, 10, seed=5), EpochSampler(100, 10, seed=5)
    np.testing.assert_array_equal(a.permutation(3), b.permutation(3))
    np.testing.assert_array_equal(a.permutation(3), np.random.default_rng([5, 3]).permutation(100))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), EpochSampler(100, 10, seed=6).permutation(0))
    np.testing.assert_array_equal(EpochSampler(10, 3, shuffle=False).batch(0, 3), [9])


def test_local_batches_start_resumes_mid_epoch():
    sampler = EpochSampler(50, 7, seed=2)
    everything = list(sampler.local_batches(4, rank=1, world_size=3))
    resumed = list(sampler.local_batches(4, rank=1, world_size=3, start=3))
    assert [k for k, _, _ in resumed] == list(range(3, sampler.num_batches))
    for (k1, g1, i1), (k2, g2, i2) in zip(everything[3:], resumed, strict=True):
        assert (k1, g1) == (k2, g2)
        np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 13])
@pytest.mark.parametrize("world_size", [1, 3, 4, 9])
def test_shard_matches_array_split(size, world_size):
    indices = np.arange(100, 100 + size)
    for rank in range(world_size):
        np.testing.assert_array_equal(EpochSampler.shard(indices, rank, world_size),
                                      np.array_split(indices, world_size)[rank])


# ------------------------------------------------------------------ augmentation

def test_shift_offsets_deterministic_and_bounded():
    a = shift_offsets(1, 2, 3, 500, 2)
    assert a.shape == (500, 2) and a.min() == -2 and a.max() == 2
    np.testing.assert_array_equal(a, shift_offsets(1, 2, 3, 500, 2))
    assert not np.array_equal(a, shift_offsets(1, 2, 4, 500, 2))
    assert not np.array_equal(a, shift_offsets(1, 3, 3, 500, 2))
    assert not np.any(shift_offsets(1, 2, 3, 10, 0))


def test_random_shift_zero_offsets_is_identity_copy():
    x = np.random.default_rng(0).standard_normal((4, 6, 5, 2)).astype(np.float32)
    y = random_shift(x, np.zeros((4, 2), int))
    np.testing.assert_array_equal(x, y)
    assert y is not x and y.dtype == np.float32


def test_random_shift_moves_a_pixel_where_expected():
    x = np.full((2, 28, 28, 1), -0.5, np.float32)
    x[:, 10, 12, 0] = 3.0
    y = random_shift(x, np.array([[2, -3], [-1, 4]]))
    assert y[0, 12, 9, 0] == 3.0 and y[1, 9, 16, 0] == 3.0
    assert np.count_nonzero(y == 3.0) == 2 and np.all(y[y != 3.0] == -0.5)


def test_random_shift_matches_a_per_image_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 7, 8, 3)).astype(np.float32)
    offsets = rng.integers(-9, 10, size=(9, 2))
    got = random_shift(x, offsets, fill=-7.0)
    for i, (dy, dx) in enumerate(offsets):  # the slow, obvious version
        want = np.full_like(x[i], -7.0)
        ys, xs = slice(max(dy, 0), 7 + min(dy, 0)), slice(max(dx, 0), 8 + min(dx, 0))
        src_y, src_x = slice(max(-dy, 0), 7 - max(dy, 0)), slice(max(-dx, 0), 8 - max(dx, 0))
        if ys.start < ys.stop and xs.start < xs.stop:
            want[ys, xs] = x[i, src_y, src_x]
        np.testing.assert_array_equal(got[i], want)


def test_random_shift_default_fill_is_each_images_background():
    x = np.full((2, 4, 4, 1), 1.0, np.float32)
    x[0, 3, 3], x[1, 0, 0] = -2.0, -5.0
    y = random_shift(x, np.array([[0, 4], [4, 0]]))  # shifted fully out
    assert np.all(y[0] == -2.0) and np.all(y[1] == -5.0)
