"""The step's Allreduce: the shared-memory sum against MPI's, under mpirun."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dpcnn import checkpoint

from conftest import MPIRUN, check_ok, needs_data, run_train, train_env

pytestmark = pytest.mark.mpi

# Each rank sums a step buffer through Dist (shared memory when all ranks share a host) and
# through MPI's Allreduce, for several sizes and dtypes, three sums in a row (the buffer is
# rewritten between sums, as the training loop does), and rank 0 reports both results.
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from dpcnn.dist import Dist, SharedSum
    dist = Dist()
    out = {}
    for size in (1, 2, 5, 1000, 206926):
        for dtype in (np.float32, np.float64):
            buf = dist.step_buffer(size, dtype)
            assert isinstance(dist._shared, SharedSum) == (sys.argv[1] == "shared"), dist._shared
            assert not buf.any()
            for step in range(3):
                rng = np.random.default_rng([dist.rank, size, step])
                mine = (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 3, size)).astype(dtype)
                buf[:] = mine
                dist.allreduce_sum_(buf)
                ref, scale = mine.copy(), np.abs(mine)
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, ref)
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, scale)
                out[f"{size}-{np.dtype(dtype).name}-{step}"] = np.stack([buf.copy(), ref, scale])
            dist.release()
    if dist.rank == 0:
        np.savez(sys.argv[2], **out)
""")


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_shared_memory_sum_matches_mpi_allreduce(tmp_path, ranks):
    out = tmp_path / "sums.npz"
    proc = subprocess.run([str(MPIRUN), "-n", str(ranks), sys.executable, "-c", SCRIPT, "shared", str(out)],
                          env=train_env(), capture_output=True, text=True, timeout=120)
    check_ok(proc)
    sums = np.load(out)
    assert len(sums.files) == 5 * 2 * 3
    for key in sums.files:
        ours, mpi, scale = sums[key]
        if ranks == 2:  # a + b either way
            np.testing.assert_array_equal(ours, mpi, err_msg=key)
        else:  # rank order vs MPI's association: the same sum up to rounding (sum of |terms| * eps)
            assert np.all(np.abs(ours - mpi) <= ranks * np.finfo(ours.dtype).eps * scale), key


def test_mpi_allreduce_is_used_when_asked(tmp_path):
    proc = subprocess.run([str(MPIRUN), "-n", "2", sys.executable, "-c", SCRIPT, "mpi", str(tmp_path / "s.npz")],
                          env=train_env(DPCNN_ALLREDUCE="mpi"), capture_output=True, text=True, timeout=120)
    check_ok(proc)


def test_training_is_bitwise_the_same_through_shared_memory_or_mpi(workdir):
    needs_data()
    params = {}
    for how in ("auto", "mpi"):
        run_dir = workdir / how
        check_ok(run_train(2, "model=small", "trainer.max_steps=20", "tracking=none", "trainer.progress=false",
                           f"hydra.run.dir={run_dir}", cwd=workdir, env=train_env(DPCNN_ALLREDUCE=how)))
        params[how] = checkpoint.load(run_dir / "checkpoints").params
    np.testing.assert_array_equal(params["auto"], params["mpi"])
