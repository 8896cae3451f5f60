"""Shared helpers of the benchmarks: one BLAS thread, the shipped model specs,
median-of-windows timing and the PyTorch twin of a model spec.

Import this module BEFORE numpy anywhere else in a bench script: the BLAS
thread count is read from the environment when the BLAS library loads.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import atexit  # noqa: E402
import datetime as _dt  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dpcnn  # noqa: E402  (after the BLAS variables and ROOT on the path)
from dpcnn.layers import Conv2D, Dense  # noqa: E402
from dpcnn.model import Model  # noqa: E402


def model_spec(name: str) -> list[dict]:
    """Layer specs of conf/model/<name>.yaml."""
    return yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())["layers"]


def time_windows(fn, *, warmup: int = 5, windows: int = 7, reps: int = 10) -> list[float]:
    """Seconds per call of fn(), one figure per window of ``reps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return out


def median(xs) -> float:
    return statistics.median(xs)


def interleaved(fns: dict, *, warmup: int = 3, windows: int = 7, reps: int = 10,
                clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, windows of the contenders interleaved.

    Interleaving (A B C A B C ...) makes a burst of load on a noisy machine hit
    every contender alike, so the ratios measured in one run stay meaningful.
    ``clock=time.process_time`` times the CPU this process used instead of the
    wall: on a host whose other jobs take the cores away in bursts (time slicing),
    CPU time still measures per-core speed (caches and memory stay shared).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(windows):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(reps):
                fn()
            times[k].append((clock() - t0) / reps)
    return {k: median(v) for k, v in times.items()}


def train_flops(specs: list[dict], input_shape=(28, 28, 1)) -> int:
    """FLOPs of one training image in the convs and dense layers as direct GEMMs: 2 x the
    multiply-adds of the forward pass, times 3 (forward, input gradient, weight gradient).
    Issue 21's count: 7.3 MFLOP for `small`."""
    model = Model.from_config(specs, input_shape=input_shape)
    fwd = 0
    for layer, out in zip(model.layers, model.shapes):  # out: the layer's output shape
        if type(layer) is Conv2D:
            fwd += 2 * out[0] * out[1] * layer.W.size
        elif type(layer) is Dense:
            fwd += 2 * layer.W.size
    return 3 * fwd


def sgemm_gflops(n: int = 1024, windows: int = 9) -> float:
    """One float32 ``n x n x n`` GEMM (NumPy's BLAS, this process's threads): the median GFLOP/s
    of ``windows`` timed products. The direct-GEMM ceiling of a model is this / `train_flops`."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times) / 1e9


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> dict:
    """CPU model and counts, BLAS and versions: what a figure was measured on."""
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                         "MKL_NUM_THREADS")},
            "malloc": "freed memory kept (dpcnn.memory)" if dpcnn.MALLOC_TUNED else "the C library's defaults"}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core"):
                info[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from threadpoolctl import threadpool_info  # optional
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for d in threadpool_info()]
    except ImportError:
        pass
    return info


def torch_available() -> bool:
    """Whether torch is installed, without importing it."""
    return importlib.util.find_spec("torch") is not None


def try_torch():
    """The torch module with one intra-op thread, or None when not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def torch_model(torch, specs: list[dict], input_shape=(28, 28, 1), bn_momentum=None):
    """nn.Sequential equivalent to a dpcnn layer spec list (NCHW inside torch).

    ``bn_momentum(m)`` maps a batchnorm spec's momentum to torch's (default: the same).
    """
    nn = torch.nn
    h, w, c = input_shape
    mods, flat = [], None
    for s in specs:
        t = s["type"]
        if t == "conv":
            k, st, p = s.get("kernel_size", 3), s.get("stride", 1), s.get("padding", "same")
            if p == "same":
                assert st == 1 and k % 2 == 1, "bench twin supports odd 'same' kernels at stride 1"
                p = k // 2
            elif p == "valid":
                p = 0
            mods.append(nn.Conv2d(c, s["filters"], k, st, p))
            h, w, c = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1, s["filters"]
        elif t == "relu":
            mods.append(nn.ReLU())
        elif t in ("maxpool", "avgpool"):
            k = s.get("kernel_size", 2)
            st = s.get("stride") or k
            mods.append((nn.MaxPool2d if t == "maxpool" else nn.AvgPool2d)(k, st))
            h, w = (h - k) // st + 1, (w - k) // st + 1
        elif t == "flatten":
            mods.append(nn.Flatten())
            flat = h * w * c
        elif t == "dense":
            mods.append(nn.Linear(flat, s["units"]))
            flat = s["units"]
        elif t == "batchnorm":
            momentum = s.get("momentum", 0.1)
            bn = nn.BatchNorm1d if flat is not None else nn.BatchNorm2d
            mods.append(bn(flat or c, eps=s.get("eps", 1e-5),
                           momentum=bn_momentum(momentum) if bn_momentum else momentum))
        elif t == "dropout":
            mods.append(nn.Dropout(s.get("rate", 0.5)))
    return nn.Sequential(*mods)


def torch_step_fn(torch, specs, batch: int, lr: float = 0.01, seed: int = 0, channels_last: bool = False):
    """A closure doing one forward + backward + plain SGD step in PyTorch.

    ``channels_last`` runs the convolutions and pools in NHWC memory order (our
    layout); on this CPU it is the faster of the two, mostly in max pooling.
    """
    torch.manual_seed(seed)
    net = torch_model(torch, specs)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 1, 28, 28), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    return step


def numpy_step_fn(specs, batch: int, lr: float = 0.01, seed: int = 0):
    """A closure doing one dpcnn forward + backward + plain SGD step on the flat buffer."""
    return numpy_step_fn_for(Model, specs, batch, lr, seed)


def write_json(name: str, payload: dict) -> Path:
    path = BENCH / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def baseline_model_class(rev: str):
    """`Model` of dpcnn at git revision ``rev``, imported as a separate package, so a run can time
    the old code against the new. Every module at the top of dpcnn/ at that revision is copied (not
    a list of the model's modules: each new module the model imported broke such a list)."""
    pkg = "dpcnn_" + "".join(ch if ch.isalnum() else "_" for ch in rev)
    root = Path(tempfile.mkdtemp(prefix="dpcnn_baseline_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / pkg).mkdir()
    (root / pkg / "__init__.py").write_text("")
    at_rev = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "dpcnn/"],
                            capture_output=True, text=True, check=True).stdout.split()
    for name in (n.removeprefix("dpcnn/") for n in at_rev if n.endswith(".py") and n != "dpcnn/__init__.py"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:dpcnn/{name}"],
                             capture_output=True, text=True, check=True).stdout
        (root / pkg / name).write_text(src)
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{pkg}.model").Model


def numpy_step_fn_for(model_cls, specs, batch: int, lr: float = 0.01, seed: int = 0):
    """`numpy_step_fn` for another Model class (e.g. from `baseline_model_class`)."""
    model = model_cls.from_config(specs, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        model.loss_and_grads(x, y)
        model.params -= lr * model.grads
    return step
