"""Host (CPU-side) cost of each KD loss: microseconds and aten ops per call (not a test; prints a table).

    python benchmarks/bench_host.py                            # CPU, 1 thread, B = 8, C = 100, 2000 rounds
    python benchmarks/bench_host.py --rounds 200 --json host.json
    python benchmarks/bench_host.py --device cuda              # on a GPU: the launches, synchronised per call
    python benchmarks/bench_host.py --dtype bfloat16           # the logits' dtype under bf16 autocast

Why: on an NVIDIA H200 the KD step of resnet32x4 -> resnet8x4 takes about 9-10 ms at batch 64, 128
and 256 alike. A step time nearly flat in the batch means the GPU waits for the CPU: the step is
bound by the Python and dispatcher work that launches its kernels, not by the kernels. There, what a
loss costs on top of the KL step is the host time of its extra aten ops (each one a dispatch and, on
the GPU, usually a kernel launch), and that is what this script measures, without a GPU.

What: for each loss of kl, dkl, ikl, gkl and dkd (the hyper-parameters of benchmarks/bench_train.py,
HPARAMS) one call is what a training step does with the loss: ``dkl_lib.losses.loss_terms`` on a
leaf student-logits tensor (requires_grad) and a frozen teacher-logits tensor, the sum of the terms,
for ikl and gkl the class-prior update (``ClassPrior._update_checked``, after the loss and before the
backward, as bench_train's ``Bench.step`` and ``dkl_lib.train.distill`` do), and the backward. The
logits are tiny (default B = 8, C = 100, float32), so that the kernels themselves cost next to
nothing and the time is the host's. Reported per loss:

- aten ops / call: the aten operators dispatched by one call (forward, prior update and backward),
  counted with a ``TorchDispatchMode`` in a separate untimed call after the warm-up; the JSON splits
  them into forward / prior / backward and gives how many are views (no kernel of their own);
- host us / call: the median wall time of a call, over ``--rounds`` rounds in which every loss runs
  once, in an order shuffled anew each round (``random.Random(--order-seed)``), so that no loss
  always follows the same one; single-threaded by default (``torch.set_num_threads(1)``);
- extra us over KL and time / KL: the median of the per-round differences to, and ratios to, the
  KL call of the same round (paired, so a slow round slows both and cancels out), with the
  interquartile range of the ratios in the JSON.

What it does not include: the kernels' execution time on a GPU (the GPU runs them asynchronously,
behind the host), memory traffic at training sizes, and whatever the rest of the step (the models,
the optimizer) costs, which is the same for every loss. With ``--device cuda`` every timed call is
synchronised before and after, so the time is the launches plus the (tiny) kernels.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_train import HPARAMS, PRIOR_LOSSES, PRIOR_T_W, OpCounter, paired_ratios, quartiles, sync  # noqa: E402
from dkl_lib.losses import loss_terms  # noqa: E402
from dkl_lib.prior import ClassPrior  # noqa: E402

LOSSES = ("kl", "dkl", "ikl", "gkl", "dkd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HostBench:
    """The inputs of one loss call and the call itself.

    Args:
        device: where the logits live ("cpu" or a CUDA device).
        batch: B >= 1 rows of logits.
        classes: C >= 2 classes.
        dtype: the logits' dtype (float32 by default; bfloat16 is what the models give under bf16 autocast).
        seed: of the random logits and labels.
    """

    def __init__(self, device, batch=8, classes=100, dtype=torch.float32, seed=0):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an integer >= 2, got {classes!r}")
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        # logits of a plausible scale (a trained network's spread a few units), drawn on the CPU so
        # that the values do not depend on the device
        self.student = (torch.randn(batch, classes, generator=g) * 3).to(self.device, dtype).requires_grad_()
        self.teacher = (torch.randn(batch, classes, generator=g) * 3).to(self.device, dtype)  # frozen: no grad
        self.targets = torch.randint(0, classes, (batch,), generator=g).to(self.device)
        self.prior = ClassPrior(classes, device=self.device)

    def call(self, loss, counter=None):
        """One loss call as in a training step: terms, their sum, the prior update (ikl, gkl), backward.
        With ``counter`` (an active OpCounter) its ops are counted per phase."""
        extra = {"class_prior": self.prior.prior} if loss in PRIOR_LOSSES else {}
        terms = loss_terms(loss, self.student, self.teacher, targets=self.targets, **HPARAMS[loss], **extra)
        total = sum(terms.values())
        if loss in PRIOR_LOSSES:  # after the loss validated the inputs, before the backward (as Bench.step)
            if counter is not None:
                counter.phase = "prior"
            self.prior._update_checked(self.teacher, self.targets, weight_temperature=PRIOR_T_W)
        if counter is not None:
            counter.phase = "backward"
        total.backward()
        # as optimizer.zero_grad(set_to_none=True): the next backward writes a fresh gradient instead
        # of adding to this one (no aten op of its own)
        self.student.grad = None

    def count_ops(self, loss):
        """{"forward", "prior", "backward", "total", "views", "by_op"} of one call of ``loss``."""
        with OpCounter() as counter:
            self.call(loss, counter)
        sync(self.device)
        phases = {phase: counter.ops[phase] for phase in ("forward", "prior", "backward")}
        return {**phases, "total": sum(phases.values()), "views": sum(counter.views.values()),
                "by_op": dict(sorted(counter.names.items()))}


def measure(device="cpu", losses=LOSSES, batch=8, classes=100, dtype=torch.float32, rounds=2000, warmup=50,
            order_seed=0):
    """Host time and aten ops per call of each loss, measured round-robin in a shuffled order.

    Args:
        device: "cpu" or a CUDA device (each timed call is then synchronised before and after).
        losses: names from LOSSES; "kl" (the reference of the ratios) is measured in any case.
        batch, classes, dtype: the logits (see :class:`HostBench`).
        rounds: timed rounds, >= 1; each runs every loss once.
        warmup: untimed rounds first, >= 0 (the first calls allocate, fill caches and check the prior).
        order_seed: seed of ``random.Random``, which shuffles the order of the losses in every round.

    Returns:
        {loss: {"us": median microseconds per call, "extra_us": median of the per-round differences
        to the KL call, "ratio_to_kl": median of the per-round ratios to the KL call, "ratio_to_kl_iqr":
        [q1, q3] of those ratios, "ops": aten ops per call, "ops_detail": see HostBench.count_ops}},
        in the order of LOSSES.
    """
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown losses {unknown}; choose from {','.join(LOSSES)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    losses = [name for name in LOSSES if name in set(losses) | {"kl"}]
    bench = HostBench(device, batch, classes, dtype)
    rng = random.Random(order_seed)

    def timed(loss):
        sync(bench.device)
        t0 = time.perf_counter()
        bench.call(loss)
        sync(bench.device)
        return time.perf_counter() - t0

    samples = {loss: [] for loss in losses}
    for _ in range(warmup):
        for loss in rng.sample(losses, len(losses)):
            timed(loss)
    # no garbage collection in the timed rounds (as timeit does): a collection lands in whichever call
    # happens to trigger it; the calls leave no reference cycles, their graphs are freed by refcount
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for loss in rng.sample(losses, len(losses)):
                samples[loss].append(timed(loss))
    finally:
        if gc_was_enabled:
            gc.enable()
    ratios = paired_ratios(samples)
    results = {}
    for loss in losses:
        ops = bench.count_ops(loss)  # untimed, after the warm-up: the steady state of a training step
        results[loss] = {
            "us": statistics.median(samples[loss]) * 1e6,
            "extra_us": statistics.median(t - k for t, k in zip(samples[loss], samples["kl"])) * 1e6,
            "ratio_to_kl": statistics.median(ratios[loss]),
            "ratio_to_kl_iqr": list(quartiles(ratios[loss])),
            "ops": ops["total"],
            "ops_detail": ops,
        }
    return results


def table(results):
    """The markdown table of :func:`measure`'s results."""
    lines = ["| loss | aten ops / call | host us / call | extra us over KL | time / KL |", "|---|---|---|---|---|"]
    for loss, r in results.items():
        q1, q3 = r["ratio_to_kl_iqr"]
        lines.append(f"| {loss} | {r['ops']} | {r['us']:.1f} | {r['extra_us']:+.1f} | "
                     f"{r['ratio_to_kl']:.2f}x (IQR {q1:.2f}-{q3:.2f}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help="comma-separated, from %(default)s; kl, the reference, is measured in any case")
    parser.add_argument("--batch", type=int, default=8, help="rows of logits, B (default %(default)s)")
    parser.add_argument("--classes", type=int, default=100, help="classes, C (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the logits' dtype")
    parser.add_argument("--rounds", type=int, default=2000, help="timed rounds (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch (default %(default)s)")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="seed of the order of the losses, shuffled in every round (default %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not losses:
        parser.error(f"--losses: none given; choose from {','.join(LOSSES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)  # one thread: what launches a GPU step; no intra-op parallelism to time
    try:
        results = measure(device, losses, args.batch, args.classes, DTYPES[args.dtype], args.rounds, args.warmup,
                          args.order_seed)
    except ValueError as err:
        parser.error(str(err))
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}; device {label}; {torch.get_num_threads()} thread(s); B = {args.batch}, "
          f"C = {args.classes}, {args.dtype}; one call = loss_terms + sum + backward (+ prior update for ikl, gkl); "
          f"{args.warmup} untimed and {args.rounds} timed rounds, order shuffled per round (seed {args.order_seed}); "
          "host us: median per call; extra us and time / KL: medians of the per-round differences and ratios "
          "to the KL call of the same round")
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "device": label, "threads": torch.get_num_threads(),
                       "batch": args.batch, "classes": args.classes, "dtype": args.dtype, "rounds": args.rounds,
                       "warmup": args.warmup, "order_seed": args.order_seed,
                       "hparams": {loss: HPARAMS[loss] for loss in results}, "losses": results}, fh, indent=2)


if __name__ == "__main__":
    main()
