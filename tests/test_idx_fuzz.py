"""Fuzz read_idx: any input gives an array of its header's shape or a DataError, nothing else."""

import gzip
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dpcnn.errors import DataError
from dpcnn.idx import read_idx

DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DIR = Path(tempfile.mkdtemp(prefix="dpcnn-idx-fuzz-"))  # hypothesis reruns the body; no per-test fixture


@st.composite
def valid_idx(draw):
    """A well-formed IDX file: (bytes, the array it holds)."""
    code = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    raw = draw(st.binary(min_size=math.prod(shape) * np.dtype(DTYPES[code]).itemsize,
                         max_size=math.prod(shape) * np.dtype(DTYPES[code]).itemsize))
    header = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    return header + raw, np.frombuffer(raw, DTYPES[code]).reshape(shape)


@st.composite
def mutated_header(draw):
    """A header with plausible-but-wrong fields and a payload of roughly the right size."""
    magic = draw(st.sampled_from([b"\x00\x00", b"\x00\x01", b"\x1f\x00", b"\xff\xff"]))
    code = draw(st.sampled_from(sorted(DTYPES) + [0x00, 0x07, 0x0A, 0x0F, 0xFF]))
    ndim = draw(st.integers(0, 6))
    dims = draw(st.lists(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    itemsize = np.dtype(DTYPES.get(code, "u1")).itemsize
    size = min(math.prod(dims), 4096) * itemsize + draw(st.integers(-3, 3))
    return magic + bytes([code, ndim]) + struct.pack(f">{ndim}I", *dims) + b"\x07" * max(size, 0)


def maybe_gzip_and_cut(content: st.SearchStrategy) -> st.SearchStrategy:
    """Optionally gzip, then optionally flip a byte, then optionally truncate anywhere."""
    @st.composite
    def build(draw):
        data = draw(content)
        if draw(st.booleans()):
            data = gzip.compress(data, compresslevel=1)
        if data and draw(st.booleans()):  # flip one byte: bad CRC, bad deflate codes, bad header
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return data
    return build()


ANY_INPUT = st.one_of(
    st.binary(max_size=300),                                   # noise
    st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b),    # noise that claims to be gzip
    maybe_gzip_and_cut(valid_idx().map(lambda t: t[0])),       # real files, whole or cut
    maybe_gzip_and_cut(mutated_header()),                      # broken headers
)


def header_shape(data: bytes) -> tuple:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    ndim = data[3]
    return struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_INPUT)
def test_read_idx_returns_header_shape_or_raises_data_error(data):
    path = _DIR / "f.idx"
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        event("DataError")
        return
    event("array")
    assert isinstance(array, np.ndarray)
    assert array.shape == header_shape(data)


@settings(max_examples=500, deadline=None)
@given(valid_idx(), st.booleans())
def test_valid_files_round_trip_exactly(file, compress):
    data, expected = file
    path = _DIR / "v.idx"
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    array = read_idx(path)
    assert array.dtype == expected.dtype.newbyteorder("=") and array.dtype.isnative
    np.testing.assert_array_equal(array.view(np.uint8), expected.astype(array.dtype).view(np.uint8))


def test_fuzz_inputs_include_gzip_failure_modes(tmp_path):
    # Representative gzip failures (cut, header only, junk, trailing junk, bad deflate, bad CRC), checked
    # directly so that a regression names its case instead of a random example.
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")
    bad_deflate = good[:10] + b"\xff" * 8 + good[18:]  # zlib.error: invalid block type
    bad_crc = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]
    for data in (good[:-5], good[:12], b"\x1f\x8b" + b"\x00" * 20, good + b"garbage!", bad_deflate, bad_crc):
        path = tmp_path / "g"
        path.write_bytes(data)
        try:
            read_idx(path)
        except DataError:
            continue
        raise AssertionError(f"no DataError for {data!r}")


def test_a_zero_size_header_whose_other_sizes_overflow_is_a_data_error():
    # Found by the fuzz test above in CI: 0 x 256 x 50,331,648 x 721,420,288 bytes needs no data,
    # but NumPy cannot make an array of that shape ("array is too big"): a ValueError, not a DataError.
    path = _DIR / "z.idx"
    path.write_bytes(b"\x00\x00\x08\x04\x00\x00\x00\x00\x00\x00\x01\x00\x03\x00\x00\x00+\x00\x00\x00")
    with pytest.raises(DataError, match=r"z\.idx: header shape \(0, 256, 50331648, 721420288\) is too large") as e:
        read_idx(path)
    assert "\n" not in str(e.value)
