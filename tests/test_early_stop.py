"""Early stopping: the verdict from the allreduced epoch figures, best.npz kept and logged, resume trains nothing."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from dpcnn import checkpoint, config
from dpcnn.early_stop import EpochStopper
from dpcnn.errors import ConfigError

from conftest import check_ok, needs_data, run_train


class OneRank:
    """What EpochStopper needs of a Dist, for one process."""

    is_root, rank, size = True, 0, 1

    def bcast(self, obj, what=None):
        return obj

    def agree(self, fn, *args, **kwargs):
        return fn()

    def broadcast_(self, buf):
        pass


class Outputs:
    def __init__(self):
        self.saved, self.tags = [], {}
        self.tracker = self

    def save(self, model, opt_state, pos, name):
        self.saved.append((name, pos.history[-1]["epoch"], model.params.copy()))
        return None, True

    def set_tags(self, tags):
        self.tags.update(tags)


def cfg_with(**early_stopping):
    cfg = OmegaConf.structured(config.Config)
    cfg.trainer.epochs, cfg.data.val_fraction = 10, 0.1
    for key, value in early_stopping.items():
        cfg.trainer.early_stopping[key] = value
    return cfg


def run_epochs(stopper, values, model, history, out):
    """Feed val_acc values, one epoch each; the weights of epoch e are all e. Returns the epoch it stopped at."""
    for epoch, value in enumerate(values, 1):
        model.params[:] = epoch
        history.append({"epoch": epoch, "step": 10 * epoch, "val_acc": value, "val_loss": 1 - value})
        stopper.after_epoch(type("Pos", (), {"history": history})(), {"val_acc": value}, model, out)
        if stopper.reason:
            return epoch
    return None


def test_patience_min_delta_best_weights_and_replay(tmp_path):
    model = type("M", (), {"params": np.zeros(3)})()
    history, out = [], Outputs()
    stopper = EpochStopper(cfg_with(monitor="val_acc", patience=2, min_delta=0.01), history, model, OneRank(),
                           tmp_path)
    # 0.5 best; 0.505 is not better by more than 0.01; 0.6 best; then two epochs without: stop after epoch 5.
    assert run_epochs(stopper, [0.5, 0.505, 0.6, 0.59, 0.6, 0.9], model, history, out) == 5
    assert [(name, epoch) for name, epoch, _ in out.saved] == [("best.npz", 1), ("best.npz", 3)]
    assert "val_acc did not improve by more than 0.01 for 2 epoch(s); best 0.6000 at epoch 3" in stopper.reason
    assert history[-1]["stopped"] == stopper.reason and out.tags["dpcnn.best_epoch"] == "3"
    status, figures = stopper.finish(model, {"val_acc": 0.6})
    assert status == "FINISHED" and figures == {"val_acc": 0.6, "val_loss": 0.4}  # epoch 3's figures
    assert np.all(model.params == 3)  # and epoch 3's weights
    # A resumed run replays the history to the same state: it stopped, nothing more to train.
    again = EpochStopper(cfg_with(monitor="val_acc", patience=2, min_delta=0.01), history, model, OneRank(), tmp_path)
    assert again.reason == stopper.reason and again.best_epoch == 3 and again.figures({}) == figures


def test_losses_are_minimised_and_off_means_off(tmp_path):
    model = type("M", (), {"params": np.zeros(2)})()
    history, out = [], Outputs()
    stopper = EpochStopper(cfg_with(monitor="val_loss", patience=1), history, model, OneRank(), tmp_path)
    assert run_epochs(stopper, [0.5, 0.7, 0.6], model, history, out) == 3  # losses 0.5, 0.3, 0.4
    assert stopper.best_epoch == 2
    history, out = [], Outputs()
    off = EpochStopper(cfg_with(), history, model, OneRank(), tmp_path)
    assert run_epochs(off, [0.9, 0.1, 0.1, 0.1], model, history, out) is None and out.saved == []
    assert off.finish(model, {"val_acc": 0.1}) == ("FINISHED", {"val_acc": 0.1})


@pytest.mark.parametrize("change,message", [
    ({"trainer.early_stopping.monitor": "val_accuracy"}, "trainer.early_stopping.monitor must be one of val_acc"),
    ({"data.val_fraction": 0.0}, "monitor=val_acc needs a validation split"),
    ({"trainer.early_stopping.patience": 0}, "trainer.early_stopping.patience must be >= 1"),
])
def test_early_stopping_config_errors(change, message):
    cfg = cfg_with(monitor="val_acc")
    for key, value in change.items():
        OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg, 1)


@pytest.mark.mpi
def test_all_ranks_stop_at_the_same_epoch_best_npz_is_the_model_and_resume_trains_nothing(workdir):
    needs_data()
    run_dir = workdir / "run"
    # min_delta 0.9: no epoch after the first can improve on it, so patience 1 stops after epoch 2 of 6.
    args = ["model=tiny", "data.train_subset=2000", "data.val_fraction=0.1", "trainer.epochs=6",
            "trainer.early_stopping.monitor=val_acc", "trainer.early_stopping.patience=1",
            "trainer.early_stopping.min_delta=0.9", f"hydra.run.dir={run_dir}", "tracking.experiment=e",
            "tracking.plots=false", "trainer.progress=false", "trainer.collective_timeout=60",
            "trainer.setup_timeout=60"]
    proc = run_train(2, *args, cwd=workdir)
    check_ok(proc)  # a rank that went on training would leave the other waiting: the job would not end
    assert "stopping after epoch 2 of 6" in proc.stdout + proc.stderr
    last = checkpoint.load(run_dir / "checkpoints" / "last.npz")
    best = checkpoint.load(run_dir / "checkpoints" / "best.npz")
    assert last.meta["epoch"] == 2 and "early stopping: val_acc" in last.meta["history"][-1]["stopped"]
    assert best.step == last.meta["history"][0]["step"]  # epoch 1's weights
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dpcnn.stopped_epoch"] == "2"
    assert run.data.tags["dpcnn.stop_reason"].startswith("early stopping: val_acc did not improve")
    assert run.data.tags["dpcnn.best_epoch"] == "1"
    assert float(run.data.tags["dpcnn.final.val_acc"]) == pytest.approx(last.meta["history"][0]["val_acc"], 1e-5)
    assert "checkpoints/best.npz" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    import mlflow

    logged = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").unwrap_python_model().model
    np.testing.assert_array_equal(logged.params, best.params)  # the model is the best epoch's
    again = run_train(2, *args, "trainer.resume=auto", cwd=workdir)
    check_ok(again)
    assert "nothing to train: the run stopped early at epoch 2" in again.stdout + again.stderr
    assert len(client.search_runs([client.get_experiment_by_name("e").experiment_id])) == 1
    assert checkpoint.load(run_dir / "checkpoints" / "last.npz").meta == last.meta
