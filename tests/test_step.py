"""The step buffer's sum of micro-batches: float64, or the model's float32 where a step has two pieces."""

import numpy as np
import pytest
import yaml

from dpcnn import checkpoint
from dpcnn.model import Model
from dpcnn.optim import SGD
from dpcnn.sampler import EpochSampler
from dpcnn.step import StepBuffer, one_piece_a_rank, shard_pieces, sum_dtype

from conftest import REPO, check_ok, needs_data, run_train

SMALL_BN = yaml.safe_load((REPO / "conf" / "model" / "small_bn.yaml").read_text())["layers"]


def test_shard_pieces_count_the_micro_batch_pieces_of_every_rank():
    assert shard_pieces(64, 1, 32) == [2]
    assert shard_pieces(64, 2, 32) == [1, 1]  # one whole micro-batch a rank
    assert shard_pieces(64, 4, 32) == [1, 1, 1, 1]  # each micro-batch split between two ranks
    assert shard_pieces(96, 2, 64) == [1, 2]  # [0, 48) | [48, 64), [64, 96)
    assert shard_pieces(8, 2, 32) == [1, 1] and shard_pieces(1, 2, 32) == [1, 0]  # an empty shard


def test_one_piece_a_rank_only_where_every_shard_of_every_step_is_one_micro_batch():
    assert one_piece_a_rank(32, (64,), 2) and one_piece_a_rank(32, (64, 8), 2)
    assert not one_piece_a_rank(32, (64,), 1)  # two micro-batches on the one rank
    assert not one_piece_a_rank(32, (64, 1), 2)  # an empty shard in the last step
    assert not one_piece_a_rank(32, (), 2) and not one_piece_a_rank(None, (64,), 2)


@pytest.mark.parametrize("micro,batches,ranks,expected", [
    (None, (64,), 2, np.float32),  # no micro-batches: the model's dtype, as always
    (32, (64,), 1, np.float32),
    (32, (64,), 2, np.float32),
    (32, (64,), 4, np.float64),
    (32, (64, 40), 2, np.float64),  # the short last batch is 3 pieces: [0, 20) | [20, 32), [32, 40)
    (32, (64, 8), 2, np.float32),
    (32, (), 2, np.float64),  # the run's batch sizes unknown: float64
])
def test_sum_dtype_is_the_models_only_where_every_step_has_two_pieces_at_most(micro, batches, ranks, expected):
    assert sum_dtype(np.float32, micro, batches, ranks) == expected
    assert sum_dtype(np.float64, micro, batches, ranks) == np.float64


def test_sampler_batch_sizes_include_the_short_last_batch_unless_dropped():
    assert EpochSampler(5000, 64).batch_sizes == (64, 8)
    assert EpochSampler(5000, 64, drop_last=True).batch_sizes == (64,)
    assert EpochSampler(640, 64).batch_sizes == (64,)
    assert EpochSampler(40, 64).batch_sizes == (40,)
    assert EpochSampler(0, 64).batch_sizes == ()


def _train(step_batches: tuple, batch: int = 64, steps: int = 6):
    """small_bn (batch norm, dropout), 6 SGD steps in micro-batches of 32 on one rank; ``step_batches`` ()
    makes the step buffer sum in float64, (batch,) lets it sum in float32 or skip the sum (one piece)."""
    model = Model.from_config(SMALL_BN, seed=0)
    buf = StepBuffer(model, 32, step_batches=step_batches)
    opt, rng = SGD(model.trainable, momentum=0.9), np.random.default_rng(1)
    for step in range(steps):
        x, y = rng.random((batch, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, batch)
        buf.clear_slots()
        buf.shard_gradient(x, y, batch, 0, step)
        buf.reduce(_OneRank)
        opt.step(buf.grad, 0.05)
    return buf, model


class _OneRank:
    @staticmethod
    def allreduce_sum_(buf):
        return None


def test_two_micro_batches_summed_in_float32_train_bitwise_like_the_float64_sum():
    """a + b rounded once to float32 is float64's exact a + b rounded to float32: the same weights and
    running statistics, at half the bytes."""
    buf32, fast = _train((64,))
    buf64, ref = _train(())
    assert buf32.buf.dtype == np.float32 and buf64.buf.dtype == np.float64 and buf32.micro == 32
    assert np.max(np.abs(ref.params - Model.from_config(SMALL_BN, seed=0).params)) > 1e-3  # it trained
    np.testing.assert_array_equal(fast.params, ref.params)
    assert buf32.correct == buf64.correct and buf32.loss == pytest.approx(buf64.loss, rel=1e-6)


def test_one_micro_batch_a_shard_trains_bitwise_like_the_micro_batch_path():
    """A shard that is one micro-batch takes the whole-shard path (no separate gradient, no sum)."""
    whole, fast = _train((32,), batch=32)
    summed, ref = _train((), batch=32)
    assert whole.micro is None and whole.buf.dtype == np.float32 and summed.micro == 32
    np.testing.assert_array_equal(fast.params, ref.params)


def test_a_step_of_a_batch_size_the_buffer_was_not_made_for_is_refused():
    model = Model.from_config(SMALL_BN, seed=0)
    buf = StepBuffer(model, 32, step_batches=(64,))
    x, y = np.zeros((96, 28, 28, 1), np.float32), np.zeros(96, np.int64)
    with pytest.raises(ValueError, match="a step of 96 examples, but .* steps of \\[64\\]"):
        buf.shard_gradient(x, y, 96, 0, 0)


@pytest.mark.mpi
def test_batchnorm_in_two_micro_batches_is_bitwise_at_one_and_two_ranks(workdir):
    """small_bn, 15 steps of batch 64 in micro-batches of 32 (the float32 sum): 1 and 2 ranks end with the
    same weights and running statistics."""
    needs_data()
    params = {}
    for n in (1, 2):
        run_dir = workdir / f"ws{n}"
        check_ok(run_train(n, "model=small_bn", "trainer.epochs=1", "trainer.micro_batch=32",
                           "data.train_subset=1000", "trainer.drop_last=true", "tracking=none", f"hydra.run.dir={run_dir}",
                           "trainer.progress=false", cwd=workdir))
        params[n] = checkpoint.load(run_dir / "checkpoints" / "last.npz").params
    assert np.max(np.abs(params[1] - Model.from_config(SMALL_BN, seed=0).params)) > 1e-3
    np.testing.assert_array_equal(params[2], params[1])
