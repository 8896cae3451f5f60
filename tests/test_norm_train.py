"""Dropout, BatchNorm and Adam in the real `mpirun ... dpcnn.train`: world-size invariance, exact resume,
the served model, and bad settings stopping every rank with one line."""

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dpcnn import checkpoint
from dpcnn.data import read_idx
from dpcnn.model import Model
from dpcnn.serving import build_model, normalise, spec_from_config

from conftest import MNIST_5K, REPO, check_ok, needs_data, run_train

pytestmark = pytest.mark.mpi
QUIET = "trainer.progress=false"
SMALL_BN = yaml.safe_load((REPO / "conf" / "model" / "small_bn.yaml").read_text())["layers"]


def final(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.npz")


@pytest.mark.slow
def test_world_size_invariance_with_batchnorm_and_dropout(workdir):
    """small_bn (batchnorm after every conv and the hidden dense layer, dropout), AdamW, micro-batches of 5:
    1, 2, 3 and 4 ranks end with bitwise the same weights and running statistics after 20 float32 steps."""
    needs_data()
    params = {}
    for n in (1, 2, 3, 4):
        run_dir = workdir / f"ws{n}"
        check_ok(run_train(n, "model=small_bn", "optimizer=adamw", "trainer.max_steps=20", "trainer.batch_size=60",
                           "trainer.micro_batch=5", "tracking=none", f"hydra.run.dir={run_dir}", QUIET, cwd=workdir))
        params[n] = final(run_dir).params
    initial = Model.from_config(SMALL_BN, seed=0)
    stats = slice(initial.num_trainable, None)
    assert np.max(np.abs(params[1][:initial.num_trainable] - initial.trainable)) > 1e-3  # it trained
    assert np.max(np.abs(params[1][stats] - initial.params[stats])) > 1e-2  # the running statistics moved
    for n in (2, 3, 4):
        np.testing.assert_array_equal(params[n], params[1])


# 1,000 training images, 64 a batch, the last partial batch dropped -> 15 steps an epoch.
RESUME = ["model=small_bn", "optimizer=adamw", "optimizer.lr=0.003", "data.train_subset=1000",
          "data.augment.enabled=true", "trainer.micro_batch=16", "trainer.drop_last=true", "trainer.epochs=3",
          "tracking=none", QUIET]


@pytest.mark.slow
def test_resume_mid_epoch_with_adam_batchnorm_and_dropout_is_bitwise(workdir):
    needs_data()
    check_ok(run_train(2, *RESUME, f"hydra.run.dir={workdir / 'straight'}", cwd=workdir))
    straight = final(workdir / "straight")
    check_ok(run_train(2, *RESUME, "trainer.max_steps=22", f"hydra.run.dir={workdir / 'part'}", cwd=workdir))
    meta = final(workdir / "part").meta
    assert (meta["step"], meta["epoch"], meta["batch"]) == (22, 1, 7)
    check_ok(run_train(2, *RESUME, f"trainer.resume={workdir / 'part' / 'checkpoints'}",
                       f"hydra.run.dir={workdir / 'resumed'}", cwd=workdir))
    resumed = final(workdir / "resumed")
    assert resumed.meta["step"] == straight.meta["step"] == 45
    np.testing.assert_array_equal(resumed.params, straight.params)  # weights and running statistics
    assert set(resumed.optimizer) == {"adam_m", "adam_v", "adam_t"} and int(resumed.optimizer["adam_t"][0]) == 45
    for k in resumed.optimizer:
        np.testing.assert_array_equal(resumed.optimizer[k], straight.optimizer[k])


@pytest.mark.slow
def test_served_model_predicts_like_the_in_process_model_at_evaluation(workdir):
    """The logged MLflow model of a batchnorm/dropout network: the running statistics travel with the
    weights, dropout is off, and its probabilities are the trained model's own evaluation."""
    import mlflow.pyfunc

    needs_data()
    run_dir = workdir / "run"
    check_ok(run_train(2, *RESUME[:-2], "trainer.epochs=1", "tracking.experiment=bn", "tracking.plots=false", QUIET,
                       f"hydra.run.dir={run_dir}", cwd=workdir))
    ckpt = final(run_dir)
    spec = spec_from_config(yaml.safe_load(ckpt.meta["config"]))
    model = build_model(spec, ckpt.params)
    assert not np.all(model.batchnorms[0].running_var == 1)  # trained statistics, not the initial ones
    x = read_idx(MNIST_5K / "t10k-images-idx3-ubyte.gz")[:300, ..., None].astype(np.float32) / 255
    expected = model.predict_proba(normalise(x, spec))
    # The same network evaluated layer by layer (no fusion: BN not folded into the conv filters).
    model._fuse = False
    np.testing.assert_allclose(model.predict_proba(normalise(x, spec)), expected, rtol=1e-4, atol=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bn").experiment_id])
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(x)
    np.testing.assert_array_equal(served["label"].to_numpy(), expected.argmax(axis=1))
    np.testing.assert_allclose(served.filter(like="prob_").to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert run.data.metrics["test_acc"] > 0.7  # 15 steps: it learned


@pytest.mark.parametrize("overrides,message", [
    (["model=small_bn", "trainer.micro_batch=32", "model.layers.12.rate=1.0"],
     "model layer 12 ({type: dropout, rate: 1.0}) with input (128): dropout rate must be in [0, 1), got 1.0"),
    (["model=tiny", "trainer.micro_batch=32", "model.layers.0={type:batchnorm}"],
     "batchnorm needs a conv or dense layer before it"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.0]"], "optimizer.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    (["model=small_bn"], "a model with batchnorm needs trainer.micro_batch"),
    (["model=small_bn", "trainer.micro_batch=24"], "trainer.batch_size=64 over 2 ranks is not whole micro-batches"),
])
def test_bad_layer_and_optimizer_settings_are_one_line_on_every_rank(workdir, overrides, message):
    proc = run_train(2, *overrides, "tracking=none", QUIET, cwd=workdir, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(message) == 2, proc.stderr
    assert "Traceback" not in proc.stderr
