"""Multi-host training on an emulated cluster: what the network costs dpcnn, and PyTorch DDP.

For 2 and 3 hosts (one rank each; launch/emulated-cluster.sh, network namespaces joined by veth
links) at each link rate (tc tbf: 1gbit, 10gbit, unshaped), it runs, interleaved:

- dpcnn across the hosts: ``emulated-cluster.sh run N`` (launch/multihost.sh, MPICH/UCX over TCP);
- dpcnn with the same N ranks on one host (plain ``mpirun -n N``: shared memory);
- PyTorch DDP (gloo) across the same hosts, and on one host, same model (the `small` twin from
  bench/common.py), same global batch, started through the same hydra launcher.

dpcnn figures are the training loop's own (median over the epochs after the first of mnist-5k:
img/s and the Allreduce's share of the step, waiting for the slower rank included). DDP figures are
medians of timed windows; its "exposed comm" is 1 - t(no_sync step) / t(step), the part of the
step the gradient Allreduce adds (DDP overlaps it with backward, so it is not a plain share).
Bytes on the wire: each host's eth0 counters around a run, per training step, against the step's
buffer (dpcnn: gradients + 4 metric slots, float32; DDP: the gradients).

Every figure is the median over --repeats rounds; a round runs every configuration once, so a
slow spell of a shared machine hits them all. Needs root (namespaces) and the data
(DPCNN_DATA_DIR, e.g. ../shared/data/mnist-5k); torch (`pip install -e '.[bench]'`) for DDP.

    python bench/bench_cluster.py [--hosts 2 3] [--rates 1gbit 10gbit none] [--repeats 3] [--epochs 5]

Prints a table and writes bench/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402,F401  (first: one BLAS thread before numpy loads)
from bench_scaling import MPIRUN, REPO, env, steady, train_args  # noqa: E402

SCRIPT = REPO / "launch" / "emulated-cluster.sh"
MODEL, BATCH = "small", 64


# ------------------------------------------------------------------------------- the DDP worker

def ddp_worker(args) -> None:
    """One DDP rank (rank and size from hydra's PMI_RANK / PMI_SIZE); rank 0 prints a JSON line."""
    torch = common.try_torch()
    import torch.distributed as tdist

    rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    tdist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank, world_size=size)
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(common.torch_model(torch, common.model_spec(MODEL)))
    shard = BATCH // size + (rank < BATCH % size)  # the global batch split as dpcnn splits it
    g = torch.Generator().manual_seed(rank)
    x, y = torch.rand((shard, 1, 28, 28), generator=g), torch.randint(0, 10, (shard,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    def unsynced():
        with net.no_sync():
            step()

    def window(fn) -> float:
        tdist.barrier()  # every rank starts the window together
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        tdist.barrier()
        return (time.perf_counter() - t0) / args.reps

    for _ in range(args.reps):
        step()
    synced, alone = [], []
    for _ in range(args.windows):
        synced.append(window(step))
        alone.append(window(unsynced))
    if rank == 0:
        t, t0 = median(synced), median(alone)
        grad = sum(p.numel() for p in net.parameters()) * 4
        print("DDP " + json.dumps({"img_per_s": BATCH / t, "exposed_comm": max(0.0, 1 - t0 / t),
                                   "synced_steps": args.reps * (1 + args.windows), "grad_bytes": grad}), flush=True)
    tdist.destroy_process_group()


def ddp_command(master: str, port: int, windows: int, reps: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", "--master", master, "--port", str(port),
            "--windows", str(windows), "--reps", str(reps)]


def parse_ddp(proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode != 0:
        raise RuntimeError(f"DDP run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DDP "))
    return json.loads(line[4:])


# ------------------------------------------------------------------------------- the cluster

class Cluster:
    def __init__(self, hosts: int):
        self.name, self.hosts = f"bench{os.getpid()}", hosts
        self.cmd("up", str(hosts))

    def cmd(self, *args: str, extra_env: dict | None = None, cwd=None, check=True) -> subprocess.CompletedProcess:
        e = env(PYTHON=sys.executable, MPIRUN=str(MPIRUN), DPCNN_QUIET="1", **(extra_env or {}))
        proc = subprocess.run([str(SCRIPT), "--name", self.name, *args], env=e, cwd=cwd, capture_output=True,
                              text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"emulated-cluster.sh {' '.join(args[:3])}... failed:\n{proc.stderr[-3000:]}")
        return proc

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        rows = [line.split() for line in self.cmd("stats").stdout.splitlines()[1:]]
        return {host: (int(rx), int(tx)) for host, rx, tx in rows}

    def measured(self, run) -> tuple[object, list[float]]:
        """run()'s result and, per host, the bytes its eth0 received while it ran."""
        before = self.link_bytes()
        out = run()
        after = self.link_bytes()
        return out, [after[h][0] - before[h][0] for h in sorted(after)]

    def down(self):
        self.cmd("down", check=False)


#: dpcnn's ways of reducing the step (issue 18), measured side by side: today's one blocking Allreduce after
#: backward, the buckets started during backward (the default), and those with 16-bit gradients.
VARIANTS = {"blocking": ["trainer.overlap=false"], "overlap": ["trainer.overlap=true"],
            "fp16": ["trainer.overlap=true", "trainer.grad_compression=fp16"],
            "bf16": ["trainer.overlap=true", "trainer.grad_compression=bf16"],
            # the bucket size: a bucket per layer, and one bucket for everything (started at backward's end)
            "bucket0": ["trainer.overlap=true", "trainer.bucket_bytes=0"],
            "bucket1m": ["trainer.overlap=true", "trainer.bucket_bytes=1048576"]}
SHARES = ("allreduce_frac", "comm_wait_frac", "comm_transfer_frac")


def figures(run_dir: Path) -> dict:
    """img/s and the reduction's shares (waiting for the slower rank, transfer), medians after the first epoch."""
    from dpcnn import checkpoint

    history = checkpoint.load(run_dir / "checkpoints").meta["history"]
    epochs = history[1:] or history
    return {**steady(run_dir), **{k: median(e[k] for e in epochs) for k in SHARES[1:] if k in epochs[0]}}


def dpcnn_across(cluster: Cluster, epochs: int, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [*train_args(run_dir, MODEL, BATCH, epochs)[2:], *VARIANTS[variant]]
        run = lambda: cluster.cmd("run", str(cluster.hosts), *args, cwd=tmp)  # noqa: E731
        _, rx = cluster.measured(run)
        from dpcnn import checkpoint

        ckpt = checkpoint.load(run_dir / "checkpoints")
        buffer = (ckpt.params.size + 4) * 4
        return {**figures(run_dir), "rx_per_step": [b / ckpt.step / buffer for b in rx], "buffer_bytes": buffer}


def dpcnn_one_host(n: int, epochs: int, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [str(MPIRUN), "-n", str(n), sys.executable, *train_args(run_dir, MODEL, BATCH, epochs),
               *VARIANTS[variant]]
        subprocess.run(cmd, cwd=tmp, env=env(DPCNN_MPI_WAIT="auto"), check=True, capture_output=True)
        return figures(run_dir)


def step_anatomy(n: int, epochs: int) -> dict:
    """One profiled run on one host (trainer.profile): median ms of forward, backward, the optimizer and the
    step, and how much of backward is left once the first bucket (the dense layers) is on its way; the
    cost model (bench/cost_model.py) hides the transfer behind that."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [str(MPIRUN), "-n", str(n), sys.executable, *train_args(run_dir, MODEL, BATCH, epochs),
               "trainer.profile=true"]
        subprocess.run(cmd, cwd=tmp, env=env(DPCNN_MPI_WAIT="auto"), check=True, capture_output=True)
        trace = json.loads((run_dir / "timeline" / "timeline.json").read_text())["traceEvents"]
    spans: dict = {}
    for e in trace:
        if e["ph"] == "X" and e["args"]["step"] >= 79:  # after the first epoch
            spans.setdefault((e["pid"], e["args"]["step"]), {})[e["name"]] = (e["ts"] / 1e3, e["dur"] / 1e3)
    rows = [(d["forward"][1], d["backward"][1], d["optimizer"][1],
             d["backward"][0] + d["backward"][1] - d["bucket 0"][0]) for d in spans.values()
            if {"forward", "backward", "optimizer", "bucket 0"} <= set(d)]
    fwd, bwd, opt, hide = (median(col) for col in zip(*rows))
    return {"forward_ms": fwd, "backward_ms": bwd, "optimizer_ms": opt, "hideable_ms": hide}


def ddp_across(cluster: Cluster, windows: int, reps: int) -> dict:
    run = lambda: parse_ddp(cluster.cmd("mpirun", str(cluster.hosts), *ddp_command("198.18.0.1", 29500, windows, reps),
                                        extra_env={"GLOO_SOCKET_IFNAME": "eth0"}, check=False))  # noqa: E731
    out, rx = cluster.measured(run)
    return {**out, "rx_per_step": [b / out["synced_steps"] / out["grad_bytes"] for b in rx]}


def ddp_one_host(n: int, windows: int, reps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return parse_ddp(subprocess.run([str(MPIRUN), "-n", str(n), *ddp_command("127.0.0.1", port, windows, reps)],
                                    env=env(GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True))


# ------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit", "none"])
    ap.add_argument("--variants", nargs="+", default=["blocking", "overlap", "fp16"], choices=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5, help="dpcnn: epochs of mnist-5k (79 steps each), first is warm-up")
    ap.add_argument("--windows", type=int, default=7, help="DDP: timed windows of each kind")
    ap.add_argument("--reps", type=int, default=20, help="DDP: steps per window")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--out", default=str(BENCH / "cluster.json"))
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    if not os.environ.get("DPCNN_DATA_DIR"):
        sys.exit("set DPCNN_DATA_DIR to a folder with MNIST (e.g. ../shared/data/mnist-5k)")
    ddp = not args.no_ddp and common.torch_available()
    load0, t_start = common.load_average(), time.time()
    rows, anatomy = [], {}
    for n in args.hosts:
        anatomy[n] = step_anatomy(n, 3)
        print(f"{n} ranks on one host, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in anatomy[n].items()))
        cluster = Cluster(n)
        try:
            rounds = [one_round(cluster, n, args, ddp, r) for r in range(args.repeats)]
        finally:
            cluster.down()
        rows += summarise(rounds, n, args, ddp)
    load1 = common.load_average()
    print(f"\n{MODEL}, global batch {BATCH}, one rank per host, 1 BLAS/intra-op thread per rank, "
          f"median of {args.repeats} interleaved rounds; load average {load0:.1f} -> {load1:.1f}, "
          f"{(time.time() - t_start) / 60:.0f} min")
    print_table(rows)
    Path(args.out).write_text(json.dumps({"model": MODEL, "batch": BATCH, "repeats": args.repeats,
                                          "epochs": args.epochs, "load": [load0, load1], "machine": common.machine(),
                                          "anatomy": anatomy, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def one_round(cluster: Cluster, n: int, args, ddp: bool, r: int) -> dict:
    """Every configuration once: each variant across the hosts at each rate, DDP there, then on one host."""
    got = {}
    for rate in args.rates:
        cluster.cmd("rate", rate)
        for variant in args.variants:
            got[(variant, rate)] = dpcnn_across(cluster, args.epochs, variant)
        if ddp:
            got[("ddp", rate)] = ddp_across(cluster, args.windows, args.reps)
    for variant in args.variants:
        got[(variant, "one host")] = dpcnn_one_host(n, args.epochs, variant)
    if ddp:
        got[("ddp", "one host")] = ddp_one_host(n, args.windows, args.reps)
    print(f"{n} hosts, round {r + 1}: " + ", ".join(
        f"{who}@{rate} {v['img_per_s']:,.0f}" for (who, rate), v in got.items()), flush=True)
    return got


def summarise(rounds: list[dict], n: int, args, ddp: bool) -> list[dict]:
    """Medians over the rounds; ratios are taken within a round (the same spell of load), then the median."""
    rows = []
    for rate in [*args.rates, "one host"]:
        for who in [*args.variants, *(["ddp"] if ddp else [])]:
            runs = [g[(who, rate)] for g in rounds]
            row = {"hosts": n, "rate": rate, "who": who, "img_per_s": median(x["img_per_s"] for x in runs),
                   "vs_one_host": median(g[(who, rate)]["img_per_s"] / g[(who, "one host")]["img_per_s"]
                                         for g in rounds)}
            for share in (*SHARES, "exposed_comm"):
                if share in runs[0]:
                    row[share] = median(x[share] for x in runs)
            if "rx_per_step" in runs[0]:
                row["rx_per_step"] = [median(x["rx_per_step"][h] for x in runs) for h in range(n)]
                row["buffer_bytes"] = runs[0].get("buffer_bytes", runs[0].get("grad_bytes"))
            if who != "ddp":
                row["vs_blocking_one_host"] = median(g[(who, rate)]["img_per_s"] / g[(args.variants[0], "one host")]
                                                     ["img_per_s"] for g in rounds)
                if ddp:
                    row["vs_ddp"] = median(g[(who, rate)]["img_per_s"] / g[("ddp", rate)]["img_per_s"] for g in rounds)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| hosts | link | who | img/s | vs one host | vs blocking on one host | allreduce (waiting + transfer) "
          "| rx/step (x buffer) | vs DDP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        share = row.get("allreduce_frac", row.get("exposed_comm", float("nan")))
        split = (f" ({row['comm_wait_frac']:.1%} + {row['comm_transfer_frac']:.1%})"
                 if "comm_wait_frac" in row else " (exposed)" if "exposed_comm" in row else "")
        rx = " / ".join(f"{x:.2f}" for x in row["rx_per_step"]) if "rx_per_step" in row else "-"
        cells = [row["hosts"], row["rate"], row["who"], f"{row['img_per_s']:,.0f}", f"{row['vs_one_host']:.2f}",
                 f"{row['vs_blocking_one_host']:.2f}" if "vs_blocking_one_host" in row else "-", f"{share:.1%}{split}",
                 rx, f"{row['vs_ddp']:.2f}" if "vs_ddp" in row else "-"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
