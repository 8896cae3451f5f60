"""The step's reduction in buckets (overlap with backward), 16-bit gradients with error feedback, and
the per-rank timeline (issue 18)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dpcnn import buckets, checkpoint
from dpcnn.model import Model

from conftest import MPIRUN, REPO, check_ok, needs_data, run_train, train_env

QUIET = "trainer.progress=false"
SMALL = [{"type": "conv", "filters": 16}, {"type": "relu"}, {"type": "maxpool"},
         {"type": "conv", "filters": 32}, {"type": "relu"}, {"type": "maxpool"}, {"type": "flatten"},
         {"type": "dense", "units": 128}, {"type": "relu"}, {"type": "dense", "units": 10}]


def params_of(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.npz").params


# ------------------------------------------------------------------------------ in-process

@pytest.mark.parametrize("fuse", [True, False])
def test_grad_ranges_cover_the_trainable_gradient_in_layer_order(fuse):
    model = Model.from_config(SMALL, seed=0)
    model._fuse = fuse
    ranges = [r for r in model.grad_ranges() if r is not None]
    assert ranges[0][0] == 0 and ranges[-1][1] == model.num_trainable
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in layer order


def test_backward_reports_each_steps_gradient_once_it_is_final():
    """on_grads_ready(offset) comes after the step's gradient is written: what it reports ready no
    later step changes (a bucket started then would send a stale gradient)."""
    model = Model.from_config(SMALL, seed=0)
    x, y = np.random.default_rng(0).random((8, 28, 28, 1), np.float32), np.arange(8) % 10
    model.loss_and_grads(x, y)
    final = model.grads.copy()
    model.grads[:] = np.nan
    seen = []
    model.on_grads_ready = lambda offset: seen.append((offset, model.grads[offset:model.num_trainable].copy()))
    model.loss_and_grads(x, y)
    assert [s[0] for s in seen] == sorted((s[0] for s in seen), reverse=True) and seen[-1][0] == 0
    for offset, ready in seen:
        np.testing.assert_array_equal(ready, final[offset:model.num_trainable])


def test_backward_tests_the_buckets_in_flight_inside_each_convolution():
    """A convolution's backward is most of the step and MPI moves a bucket only inside MPI calls: the
    reduction's test (on_progress) runs inside each conv step, after the step before it reported its
    gradient ready (a bucket may be in flight) and before the convolution reports its own."""
    model = Model.from_config(SMALL, seed=0)
    x, y = np.random.default_rng(0).random((8, 28, 28, 1), np.float32), np.arange(8) % 10
    events = []
    model.on_grads_ready = lambda offset: events.append(offset)
    model.on_progress = lambda: events.append("poll")
    model.loss_and_grads(x, y)
    convs = [r for step, r in zip(model._plan, model.grad_ranges()) if hasattr(step, "poll")]
    assert len(convs) == 2
    for start, end in convs:  # the step after a conv in the plan reports `end` ready first
        inside = events[events.index(end) + 1:events.index(start)]
        assert "poll" in inside, events
    model.on_progress = None
    events.clear()
    model.loss_and_grads(x, y)  # no hook set: nothing is called
    assert "poll" not in events


def test_bucket_plan_from_the_last_layer_never_splits_a_layer():
    # small: conv1 160, conv2 4,640, dense1 200,832, dense2 1,290 floats; 4 slots after.
    ranges = [(0, 160), (160, 4800), (4800, 205632), (205632, 206922)]
    assert buckets.plan(ranges, 206922, 206926, 256 << 10, 4) == [(4800, 206922), (0, 4800), (206922, 206926)]
    assert buckets.plan(ranges, 206922, 206926, 0, 4) == [(205632, 206922), (4800, 205632), (160, 4800), (0, 160),
                                                          (206922, 206926)]
    assert buckets.plan(ranges, 206922, 206926, 1 << 30, 4) == [(0, 206922), (206922, 206926)]


def test_bf16_rounds_to_nearest_even_and_keeps_float32_range():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5e38, 3e-39, 0.0, np.inf], np.float32)
    got = buckets.bf16_decode(buckets.bf16_encode(x))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1); 1 + 3*2^-8 goes up.
    np.testing.assert_array_equal(got[:3], np.array([1.0, 1.0, 1 + 2 ** -6], np.float32))
    assert np.isfinite(got[3]) and abs(got[3] / x[3] - 1) < 2 ** -8
    assert got[4] > 0 and got[5] == 0 and got[6] == np.inf
    r = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    assert np.max(np.abs(buckets.bf16_decode(buckets.bf16_encode(r)) / r - 1)) <= 2 ** -8


def test_half_codec_is_numpys_float16_on_its_normal_range_and_within_a_unit_below_it():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 5, 200_000)).astype(np.float32)
    x[:8] = [65504, 65519.99, 65520, 1e9, -7e4, 2.0 ** -14, np.nan, -np.inf]
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    got = buckets.half_encode(x)
    normal = ~(np.abs(x) < 2.0 ** -14)
    normal[6] = False  # NaN: inf on the wire (the step fails as diverged either way)
    np.testing.assert_array_equal(got[normal], ref[normal])  # ties to even, inf included
    assert got[6] & 0x7FFF == 0x7C00
    sub = ~normal
    sub[6] = False
    off = np.abs(got[sub].astype(int) - ref[sub].astype(int))  # subnormals: rounded twice, at most a unit off
    assert off.max() <= 1 and np.count_nonzero(off) < 1e-3 * sub.sum(), (off.max(), np.count_nonzero(off))
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = every.view(np.float16).astype(np.float32)
    for scale in (1.0, 64.0, 48.0):
        back = buckets.half_decode(every, scale)
        finite = np.isfinite(want)
        exact = (want[finite].astype(np.float64) / scale).astype(np.float32)
        if scale == 48.0:  # a global batch that is not a power of two: times the reciprocal, within an ulp
            np.testing.assert_allclose(back[finite], exact, rtol=2.0 ** -23, atol=0)
        else:
            np.testing.assert_array_equal(back[finite], exact)
        np.testing.assert_array_equal(np.isnan(back), np.isnan(want))
        np.testing.assert_array_equal(back[np.isinf(want)], want[np.isinf(want)])
    decode, encode = buckets.CODECS["fp16"]  # the ring's form: the sum of two halves, then rounded once
    a, b = buckets.half_encode(x[8:1008]), buckets.half_encode(x[1008:2008])
    with np.errstate(over="ignore"):
        want = (a.view(np.float16).astype(np.float32) + b.view(np.float16).astype(np.float32)).astype(np.float16)
    big = np.abs(want.astype(np.float32)) >= 2.0 ** -14
    np.testing.assert_array_equal(encode(decode(a) + decode(b))[big], want.view(np.uint16)[big])


def test_fp16_scales_into_range_and_overflows_to_inf():
    g = np.array([1e-6, 0.5, 2000.0], np.float32)
    q = buckets.half_encode(g, 64)  # the sum of 64 per-example gradients: 1e-6 is no longer subnormal
    back = buckets.half_decode(q, 64)
    np.testing.assert_allclose(back[:2], g[:2], rtol=1e-3)
    assert back[2] == np.inf  # 2000 * 64 > 65504


@pytest.mark.parametrize("key,value,message", [
    ("grad_compression", "fp8", "trainer.grad_compression must be one of none, fp16, bf16"),
    ("bucket_bytes", -1, "trainer.bucket_bytes must be >= 0"),
])
def test_bad_overlap_settings_are_config_errors(key, value, message):
    from omegaconf import OmegaConf

    from dpcnn import config
    from dpcnn.errors import ConfigError

    cfg = OmegaConf.structured(config.Config)
    cfg.trainer[key] = value
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg, 2)


# ------------------------------------------------------------------------------ under mpirun

def run_params(workdir, ranks, name, *overrides):
    run_dir = workdir / name
    check_ok(run_train(ranks, "model=small", "trainer.batch_size=60", "tracking=none", QUIET,
                       f"hydra.run.dir={run_dir}", *overrides, cwd=workdir))
    return params_of(run_dir)


@pytest.mark.mpi
def test_overlap_on_and_off_give_bitwise_the_same_weights_on_two_ranks(workdir):
    needs_data()
    on = run_params(workdir, 2, "on", "trainer.max_steps=20", "trainer.overlap=true", "trainer.bucket_bytes=0")
    off = run_params(workdir, 2, "off", "trainer.max_steps=20", "trainer.overlap=false")
    np.testing.assert_array_equal(on, off)
    assert np.max(np.abs(on - Model.from_config(SMALL, seed=0).params)) > 1e-3  # it trained


@pytest.mark.mpi
@pytest.mark.slow
def test_overlap_with_micro_batches_is_bitwise_at_one_to_three_ranks(workdir):
    needs_data()
    # (Without overlap the world sizes agree bitwise already: tests/test_train.py.)
    runs = {(n, ov): run_params(workdir, n, f"m{n}{ov}", "trainer.max_steps=20", "trainer.micro_batch=5",
                                f"trainer.overlap={ov}", "trainer.bucket_bytes=1024")
            for n, ov in ((1, "false"), (2, "true"), (3, "true"))}
    for key, params in runs.items():
        np.testing.assert_array_equal(params, runs[(1, "false")], err_msg=str(key))


@pytest.mark.mpi
@pytest.mark.slow
def test_overlap_float64_on_three_ranks_matches_the_single_reduction(workdir):
    """MPI may sum a bucket in another order than the whole buffer: equal to float64 rounding."""
    needs_data()
    f64 = ["trainer.max_steps=20", "trainer.dtype=float64"]
    on = run_params(workdir, 3, "on", *f64, "trainer.overlap=true", "trainer.bucket_bytes=0")
    off = run_params(workdir, 3, "off", *f64, "trainer.overlap=false")
    assert np.max(np.abs(on - off)) <= 1e-12


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("wire", ["fp16"])  # (bf16 takes the same path; its codec is tested above)
def test_compressed_gradients_resume_exactly_with_their_error_feedback(workdir, wire):
    """The residual of every rank is in the checkpoint: stopped at step 12 and resumed, the run ends
    bitwise where an uninterrupted one does (and it is not the uncompressed run)."""
    needs_data()
    common = ["data.train_subset=600", "trainer.epochs=2", "trainer.drop_last=true", f"trainer.grad_compression={wire}"]
    straight = run_params(workdir, 2, "straight", *common)
    part = run_params(workdir, 2, "part", *common, "trainer.max_steps=12")
    ckpt = checkpoint.load(workdir / "part" / "checkpoints" / "last.npz")
    residual = ckpt.optimizer["grad_residual"]
    assert residual.shape == (2, part.size) and np.abs(residual).max() > 0
    assert not np.array_equal(residual[0], residual[1])  # each rank's own rounding
    resumed = run_params(workdir, 2, "resumed", *common, f"trainer.resume={workdir / 'part' / 'checkpoints'}")
    np.testing.assert_array_equal(resumed, straight)
    if wire == "fp16":
        plain = run_params(workdir, 2, "plain", *common[:-1])
        assert not np.array_equal(plain, straight)  # the wire format was in effect
        # On 3 ranks the residuals of 2 do not fit one per rank: their sum goes on with rank 0, said once.
        proc = run_train(3, "model=small", "trainer.batch_size=60", "tracking=none", QUIET, *common,
                         f"trainer.resume={workdir / 'part' / 'checkpoints'}", f"hydra.run.dir={workdir / 'r3'}",
                         cwd=workdir)
        check_ok(proc)
        said = "gradient-compression residual was written by 2 ranks: its sum goes on with rank 0"
        assert (proc.stdout + proc.stderr).count(said) == 1


RING = r"""
import hashlib, sys
import numpy as np
from mpi4py import MPI
sys.path.insert(0, {repo!r})
from dpcnn.buckets import CODECS, bf16_decode, bf16_encode, half_decode, half_encode
from dpcnn.ring import Ring16

comm = MPI.COMM_WORLD.Dup()
for wire in ("fp16", "bf16"):
    decode, encode = CODECS[wire]
    to_wire, from_wire = (half_encode, half_decode) if wire == "fp16" else (bf16_encode, bf16_decode)
    for n in (1, 2, 5, 1000, 54321):
        x = np.random.default_rng(comm.rank + 7 * n).standard_normal(n).astype(np.float32)
        q = to_wire(x)
        exact = comm.allreduce(from_wire(q).astype(np.float64))
        scale = comm.allreduce(np.abs(from_wire(q)).astype(np.float64))
        mine = from_wire(q)
        ring = Ring16(comm, q, decode, encode, tag=n)
        while not ring.Test():
            pass
        got = ring.total() * np.float32(2.0 ** 112 if wire == "fp16" else 1.0)  # (fp16's ring adds scaled values)
        same = len(set(comm.allgather(hashlib.md5(got.tobytes()).hexdigest()))) == 1
        err = float(np.max(np.abs(got - exact) / scale))
        if comm.size == 2:  # one exchange: the float32 sum of the two ranks' 16-bit values, not rounded again
            a, b = comm.allgather(mine)
            err = 0.0 if np.array_equal(got, a + b) else err + 1
        if comm.rank == 0:
            print(wire, n, "same" if same else "DIFFERENT", "ok" if err <= comm.size * 2.0 ** -8 else f"err {{err}}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ring_sums_16_bit_floats_to_their_rounding_with_the_same_bits_on_every_rank(tmp_path, ranks):
    script = tmp_path / "ring.py"
    script.write_text(RING.format(repo=str(REPO)))
    proc = subprocess.run([str(MPIRUN), "-n", str(ranks), sys.executable, str(script)], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    check_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 10 and all(line.endswith("same ok") for line in lines), proc.stdout


OVERFLOW = r"""
import numpy as np, sys
from omegaconf import OmegaConf
sys.path.insert(0, {repo!r})
from dpcnn.dist import Dist
from dpcnn.errors import Diverged
from dpcnn.model import Model
from dpcnn.resume import Position
from dpcnn.step import StepBuffer
from dpcnn.train import raise_if_failed

dist = Dist()
model = Model.from_config({small!r}, seed=0)
before = model.params.copy()
step = StepBuffer(model, None, dist, overlap=False, compression={wire!r})  # buckets start in reduce()
x, y = np.random.default_rng(dist.rank).random((32, 28, 28, 1), np.float32), np.arange(32) % 10
step.clear_slots()
step.shard_gradient(x, y, 64, 32 * dist.rank, 0)
step.grad[5] = 2000.0  # a huge mean gradient (fp16 carries it times the batch: beyond 65504)
step.reduce(dist)
cfg = OmegaConf.create({{"optimizer": {{"lr": 0.1}}, "trainer": {{"checkpoint": True}}}})
try:
    raise_if_failed(step, Position(), cfg, "run")
    said = f"finite {{float(step.grad[5])}}"
except Diverged as e:
    said = f"diverged: {{e}}"
assert np.array_equal(model.params, before)
sys.stdout.write(said + "\n")  # one write per rank: lines of two ranks do not interleave
sys.stdout.flush()
"""


@pytest.mark.mpi
@pytest.mark.parametrize("wire,expected", [("fp16", "diverged: training diverged at step 0"),
                                           ("bf16", "finite 4000.0")])
def test_a_gradient_that_overflows_fp16_is_caught_as_divergence_not_nan_weights(tmp_path, wire, expected):
    script = tmp_path / "overflow.py"
    script.write_text(OVERFLOW.format(repo=str(REPO), wire=wire, small=SMALL))
    proc = subprocess.run([str(MPIRUN), "-n", "2", sys.executable, str(script)], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    check_ok(proc)
    assert proc.stdout.count(expected) == 2, proc.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_profile_writes_a_trace_and_bars_naming_every_rank_logged_to_mlflow(workdir):
    from mlflow.tracking import MlflowClient

    needs_data()
    run_dir = workdir / "run"
    proc = run_train(2, "model=small", "trainer.max_steps=30", "data.train_subset=600", "trainer.profile=true",
                     "tracking.plots=false", "tracking.log_model=false", "tracking.experiment=tl", QUIET,
                     f"hydra.run.dir={run_dir}", cwd=workdir)
    check_ok(proc)
    trace = json.loads((run_dir / "timeline" / "timeline.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert sorted(names) == [0, 1] and all(names[r].startswith(f"rank {r} (") for r in names)
    spans = [e for e in trace if e["ph"] == "X"]
    for rank in range(2):
        mine = {e["name"] for e in spans if e["pid"] == rank}
        assert {"forward", "backward", "allreduce (wait + transfer)", "optimizer", "bucket 0"} <= mine
        steps = {e["args"]["step"] for e in spans if e["pid"] == rank and e["name"] == "forward"}
        assert steps == set(range(30))
    assert all(e["dur"] >= 0 for e in spans)
    assert (run_dir / "timeline" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tl").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "timeline")} == {"timeline/timeline.json",
                                                                                   "timeline/timeline.png"}
    m = run.data.metrics
    assert m["comm_wait_frac"] >= 0 and m["comm_transfer_frac"] >= 0
    assert m["comm_wait_frac"] + m["comm_transfer_frac"] == pytest.approx(m["allreduce_frac"], rel=1e-9)
    assert "waiting" in proc.stderr + proc.stdout and "transfer" in proc.stderr + proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("action,extra", [("raise", []),
                                          ("stall", ["trainer.collective_timeout=8", "trainer.stall_warning=3"])])
def test_a_rank_that_fails_or_stalls_with_a_bucket_in_flight_ends_the_job(workdir, action, extra):
    needs_data()
    env = train_env(DPCNN_FAULT=f"rank=1,step=3,phase=backward,action={action}")
    proc = run_train(2, "model=small", "trainer.max_steps=50", "tracking=none", QUIET, "trainer.checkpoint_every=2",
                     *extra, f"hydra.run.dir={workdir / 'run'}", cwd=workdir, env=env, timeout=90)
    assert proc.returncode == 1, proc.stderr[-3000:]
    if action == "raise":
        assert "injected fault on rank 1 at step 3 (backward)" in proc.stderr
        assert proc.stderr.count("a rank failed at step 3") == 2, proc.stderr[-3000:]
    else:
        assert "rank 1 (host" in proc.stderr and "has not reached step 3" in proc.stderr, proc.stderr[-3000:]
    assert checkpoint.load(workdir / "run" / "checkpoints" / "last.npz").step == 2  # intact
