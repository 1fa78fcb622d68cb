"""Forward + backward time and peak memory of the losses (not a test; prints a table).

    python benchmarks/bench_losses.py                  # CPU (1 thread) and CUDA when present
    python benchmarks/bench_losses.py --threads 2 --json out.json
    python benchmarks/bench_losses.py --device cuda --batches 256 --classes 100,1000   # benchmarks/gpu_check.sh

Every configuration times kl, dkl, ikl (closed form) and the literal pairwise wMSE oracle
round-robin in the same process, so the ratios to kl_loss are measured side by side. Peak memory:
on CUDA, torch.cuda.max_memory_allocated above the inputs; on the CPU, the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) in a worker process whose allocator
returns every block of 4 KiB or more to the system at once (MALLOC_MMAP_THRESHOLD_), so that freed
memory is not silently reused. CPU peak memory needs Linux; elsewhere it prints "n/a".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _args, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _args import at_least  # noqa: E402
import dkl_lib as dkl  # noqa: E402

BATCHES = (64, 256)
CLASSES = (10, 100, 1000)
METHODS = {
    "kl": lambda a, b: dkl.kl_loss(a, b, temperature=4.0),
    "dkl": lambda a, b: dkl.dkl_loss(a, b, temperature=4.0),
    "ikl": lambda a, b: dkl.ikl_loss(a, b, temperature=4.0),
    "pairwise": lambda a, b: dkl.wmse_pairwise(a, b, temperature=4.0),
}


def make_inputs(batch, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(batch, classes, generator=g) * 3).to(device).requires_grad_()
    b = (torch.randn(batch, classes, generator=g) * 3).to(device).requires_grad_()
    return a, b


def step(method, a, b):
    a.grad = b.grad = None
    METHODS[method](a, b).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # MPS runs asynchronously too
        torch.mps.synchronize()


def time_config(batch, classes, device, reps, budget_s):
    """Median seconds per forward+backward for each method, measured round-robin."""
    a, b = make_inputs(batch, classes, device)
    counts = {}
    for m in METHODS:  # warm up, and size each method's repetitions to the time budget
        step(m, a, b)
        sync(device)
        t0 = time.perf_counter()
        step(m, a, b)
        sync(device)
        once = time.perf_counter() - t0
        counts[m] = max(3, min(reps, int(budget_s / max(once, 1e-9))))
    samples = {m: [] for m in METHODS}
    for r in range(max(counts.values())):
        for m in METHODS:
            if r < counts[m]:
                sync(device)
                t0 = time.perf_counter()
                step(m, a, b)
                sync(device)
                samples[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in samples.items()}


def cuda_peak(batch, classes, device):
    out = {}
    for m in METHODS:
        a, b = make_inputs(batch, classes, device)
        step(m, a, b)  # allocator warm-up
        a.grad = b.grad = None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(m, a, b)
        torch.cuda.synchronize(device)
        out[m] = torch.cuda.max_memory_allocated(device) - base
    return out


def _proc_kib(field):
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def cpu_peak_worker(configs):
    """Runs inside the worker process; returns {"B,C": {method: bytes}}."""
    out = {}
    for batch, classes in configs:
        row = {}
        for m in METHODS:
            a, b = make_inputs(batch, classes, torch.device("cpu"))
            step(m, a, b)
            a.grad = b.grad = None
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset VmHWM to the current resident set
            base = _proc_kib("VmRSS")
            step(m, a, b)
            row[m] = max(0, _proc_kib("VmHWM") - base) * 1024
        out[f"{batch},{classes}"] = row
    return out


def cpu_peak(configs, threads):
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(configs),
           "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _int_list(text, option):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{option} takes comma-separated integers, got {text!r}")
    if not values or min(values) < 1 or (option == "--classes" and min(values) < 2):
        raise SystemExit(f"{option} needs positive values{' >= 2' if option == '--classes' else ''}, got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=at_least(1), default=1, help="CPU threads (default 1)")
    parser.add_argument("--reps", type=int, default=200, help="most repetitions per method")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per method and config")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma-separated batch sizes B (default %(default)s)")
    parser.add_argument("--classes", default=",".join(map(str, CLASSES)),
                        help="comma-separated class counts C (default %(default)s)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(cpu_peak_worker(json.loads(args.memory_worker))))
        return

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        raise SystemExit("no CUDA device available")

    configs = [(b, c) for b in _int_list(args.batches, "--batches") for c in _int_list(args.classes, "--classes")]
    results = []
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
        print(f"\n### {name}, torch {torch.__version__}, float32, forward+backward, T = 4\n")
        mem = cpu_peak(configs, args.threads) if device.type == "cpu" else None
        print("| B | C | kl | dkl / kl | ikl / kl | pairwise / kl | pairwise / ikl "
              "| peak mem kl | peak mem ikl | peak mem pairwise |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for batch, classes in configs:
            t = time_config(batch, classes, device, args.reps, args.budget)
            peak = cuda_peak(batch, classes, device) if device.type == "cuda" else (
                mem[f"{batch},{classes}"] if mem else {m: None for m in METHODS})
            row = dict(device=name, batch=batch, classes=classes, seconds=t, peak_bytes=peak)
            results.append(row)
            print(f"| {batch} | {classes} | {t['kl'] * 1e3:.3f} ms | {t['dkl'] / t['kl']:.2f}x "
                  f"| {t['ikl'] / t['kl']:.2f}x | {t['pairwise'] / t['kl']:.0f}x | "
                  f"{t['pairwise'] / t['ikl']:.0f}x | {fmt_bytes(peak['kl'])} | {fmt_bytes(peak['ikl'])} "
                  f"| {fmt_bytes(peak['pairwise'])} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
