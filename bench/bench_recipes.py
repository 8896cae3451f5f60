"""The best recipes side by side: dpcnn (``mpirun -n 2 ... experiment=<recipe>``) and the same recipe in PyTorch.

    DPCNN_SHARED_DATA=../shared/data python bench/bench_recipes.py [--recipe mnist_best fashion_best]
        [--ranks 2] [--torch-threads 2] [--skip dpcnn|torch] [--set trainer.epochs=2 ...]

The recipe is composed by Hydra exactly as ``dpcnn.train`` composes it
(``experiment=<recipe>``), and the PyTorch side runs it with the same
layers (BatchNorm2d/1d, nn.Dropout), PyTorch's default initialisation (the
same distribution as dpcnn's ``fan_in_uniform``), torch.optim.AdamW with
the same betas, eps and weight decay, the learning rate of
`dpcnn.optim.make_schedule` set every step, the same epoch order
(`dpcnn.data.EpochSampler`), the same shifts (`dpcnn.data.shift_offsets`), and
the same batch-norm groups: each global batch runs as micro-batches of
``trainer.micro_batch`` with gradients accumulated, as dpcnn does at any
world size. Two differences remain: torch moves its running statistics after
every micro-batch (its momentum is set to 1 - (1 - m)**(1/k) for k
micro-batches a step, the same decay per step as dpcnn's one update with
their average), and its dropout masks come from torch's generator.

PyTorch gets ``--torch-threads`` intra-op threads in one process (default:
the 2 cores); dpcnn gets one BLAS thread per rank. Figures per epoch: test
accuracy, the training seconds so far (steps only) and the wall seconds so
far (steps and evaluation); for dpcnn also the whole command's wall time
(start-up, data loading and the end-of-run checkpoint included) and the CPU
seconds of its processes. Prints a table and writes bench/recipes.json.
Needs the ``bench`` extra (torch==2.13.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import ROOT, machine, torch_model  # noqa: E402

import numpy as np  # noqa: E402

from dpcnn import checkpoint  # noqa: E402
from dpcnn.data import EpochSampler, load_data, random_shift, shift_offsets  # noqa: E402
from dpcnn.optim import make_schedule  # noqa: E402
from dpcnn.step import micro_slices  # noqa: E402

DATA = {"mnist": "mnist-5k", "fashion_mnist": "fashion-mnist"}


def compose(recipe: str, overrides: list[str]) -> dict:
    """The recipe's whole configuration, as ``python -m dpcnn.train experiment=<recipe> [overrides]`` composes it."""
    import dpcnn.config  # noqa: F401  (registers the schema)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={recipe}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def data_dir(cfg: dict) -> Path:
    return Path(os.environ.get("DPCNN_SHARED_DATA", ROOT.parent / "shared" / "data")) / DATA[cfg["data"]["name"]]


def run_dpcnn(recipe: str, cfg: dict, ranks: int, overrides: list[str]) -> dict:
    """The real command on ``ranks`` ranks; its per-epoch history from the final checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", DPCNN_DATA_DIR=str(data_dir(cfg)),
                   MPLBACKEND="Agg", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), sys.executable, "-m", "dpcnn.train",
               f"experiment={recipe}", *overrides, "tracking=none", "trainer.progress=false",
               f"hydra.run.dir={tmp}/run"]
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        history = checkpoint.load(Path(tmp) / "run" / "checkpoints").meta["history"]
    train_s = np.cumsum([h["step_time_s"] for h in history])
    epochs = [{"epoch": h["epoch"], "test_acc": h["test_acc"], "train_s": float(t), "wall_s": h["elapsed_s"]}
              for h, t in zip(history, train_s)]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"epochs": epochs, "command_wall_s": wall, "cpu_s": cpu, "ranks": ranks}


def run_torch(cfg: dict, threads: int) -> dict:
    """The recipe in PyTorch, one process (see the module docstring for what is the same)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    t, o, layers = cfg["trainer"], cfg["optimizer"], cfg["model"]["layers"]
    data = load_data({**cfg["data"], "root": str(data_dir(cfg)), "progress": False})
    (x, y), (xte, yte) = data.train, data.test
    sampler = EpochSampler(len(x), t["batch_size"], seed=cfg["seed"], drop_last=t["drop_last"])
    micro = t["micro_batch"] or t["batch_size"]
    k = -(-t["batch_size"] // micro)
    net = torch_model(torch, layers, bn_momentum=lambda m: 1 - (1 - m) ** (1 / k))
    opt = torch.optim.AdamW(net.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    assert o["algorithm"] == "adam" and o["decoupled"], "the side-by-side runs the AdamW recipes"
    lr_at = make_schedule(o, sampler.num_batches, t["epochs"] * sampler.num_batches)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    xte_t, yte_t, loss_fn = nchw(xte), torch.from_numpy(yte), torch.nn.CrossEntropyLoss(reduction="sum")
    shift = data_shift(cfg, data)
    epochs, train_s, start, step = [], 0.0, time.perf_counter(), 0
    for epoch in range(t["epochs"]):
        net.train()
        t0 = time.perf_counter()
        for b in range(sampler.num_batches):
            idx = sampler.batch(epoch, b)
            xb, yb = nchw(shift(x[idx], epoch, b)), torch.from_numpy(y[idx])
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            for part in micro_slices(0, len(idx), micro):
                (loss_fn(net(xb[part]), yb[part]) / len(idx)).backward()
            opt.step()
            step += 1
        train_s += time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(xte_t[i:i + 1000]).argmax(1) == yte_t[i:i + 1000]).sum())
                          for i in range(0, len(yte_t), 1000))
        epochs.append({"epoch": epoch + 1, "test_acc": correct / len(yte_t), "train_s": train_s,
                       "wall_s": time.perf_counter() - start})
        print(f"  torch epoch {epoch + 1}: test acc {correct / len(yte_t):.2%}", file=sys.stderr)
    return {"epochs": epochs, "threads": threads}


def data_shift(cfg: dict, data):
    """(x, epoch, batch) -> x shifted as dpcnn's `train.Batches` shifts global batch ``batch``."""
    aug = cfg["data"]["augment"]
    if not aug["enabled"]:
        return lambda x, epoch, b: x
    return lambda x, epoch, b: random_shift(x, shift_offsets(cfg["seed"], epoch, b, len(x), aug["max_shift"]),
                                            data.background)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", nargs="+", default=["mnist_best", "fashion_best"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--skip", choices=("dpcnn", "torch"), action="append", default=[])
    ap.add_argument("--set", nargs="*", default=[], help="Hydra overrides for both sides, e.g. trainer.epochs=2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "recipes.json"))
    args = ap.parse_args()
    results = {"machine": machine(), "overrides": args.set, "load_average_at_start": os.getloadavg()}
    for recipe in args.recipe:
        cfg = compose(recipe, args.set)
        res = results[recipe] = {}
        if "dpcnn" not in args.skip:
            res["dpcnn"] = run_dpcnn(recipe, cfg, args.ranks, args.set)
        if "torch" not in args.skip:
            res["torch"] = run_torch(cfg, args.torch_threads)
        for who, r in res.items():
            last = r["epochs"][-1]
            extra = f", command {r['command_wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s" if who == "dpcnn" else ""
            print(f"{recipe:<13} {who:<6} test acc {last['test_acc']:.2%} after {last['epoch']} epochs; "
                  f"train {last['train_s']:.0f} s, train+eval {last['wall_s']:.0f} s{extra}")
    results["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
