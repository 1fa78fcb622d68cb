"""Samples/s of one knowledge-distillation training step per loss (not a test; prints a table).

    python benchmarks/bench_train.py                          # CPU (batch 64) and CUDA when present
    python benchmarks/bench_train.py --devices cpu --batch 16 --reps 3 --threads 2
    python benchmarks/bench_train.py --json out.json
    python benchmarks/bench_train.py --devices cuda --losses ce,kl,ikl --batch 256   # benchmarks/gpu_check.sh
    python benchmarks/bench_train.py --compile both --losses kl,ikl   # torch.compile'd models vs eager
    python benchmarks/bench_train.py --fixed-order                    # the old fixed order ce, kl, dkl, ...

CIFAR shapes: a resnet32x4 teacher and a resnet8x4 student (100 classes), random 3x32x32 inputs.
One step = what dkl_lib.train.distill does per batch: the frozen teacher's forward (no gradient),
the student's forward, CE + the KD terms of dkl_lib.losses.loss_terms, backward, an SGD step; for
ikl and gkl also the class-prior update (GI). "ce" is the CE-only step (no teacher at all);
"teacher" is a CE training step of the resnet32x4 itself (what training a teacher costs, when no
released teacher file is at hand; gpu_check.sh turns it into the presets' teacher time). On
CUDA the step runs under bf16 autocast with channels_last, as in training (``--amp`` and
``--channels-last`` change that; the settings used are printed). All losses are timed
round-robin in one process (one step of each in turn, repeated), so the ratios to the KL step are
measured side by side. The order of the steps is shuffled anew in every round (warm-up rounds
included) by ``random.Random(--order-seed)``: in a fixed order (ce, kl, dkl, ...) KL always ran right
after the cheaper CE step, so a position effect (caches, clocks, the allocator's state left by the
step before) could not be told apart from a cost of the loss. ``--fixed-order`` keeps that old
order, for comparison.

The ms / step and samples / s columns are medians of each loss's step times. The "time / KL step"
column is the median of the PAIRED per-round ratios: each round, a loss's step time divided by the
KL step time of the same bench in the same round (a slow round, e.g. the GPU clocking down or
another process, slows both and cancels out), with the interquartile range of those ratios beside
it; ``--json`` writes them as "ratio_to_kl" and "ratio_to_kl_iqr". Target: every KD loss within
1.10x of the KL step. The last column counts the aten operators one step dispatches (models, loss,
backward, optimizer; in one more untimed step, eager benches only; "ops_per_step" in the JSON): where
the GPU waits for the host, as on an H200 at these sizes, each one costs about the same launch time,
so a loss's extra operators over KL's are what its extra step time is made of.

``--compile on`` runs the three models through ``torch.compile`` (default inductor backend), as
``dkl_lib.train.distill(torch.compile(student), ...)`` would; ``--compile both`` times the compiled
and the eager steps round-robin in one process (a "time / eager" column: median over median), and
the table gives the compiled step's first call (the compilation) apart; the compiled and the eager
steps are each paired with their own KL step. With the shuffled order, the compilation of a model
shared by several losses (the teacher) lands in whichever of them ran first. The losses themselves
run inside the step uncompiled either way, as in training.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _args, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _args import at_least, devices as check_devices  # noqa: E402
from dkl_lib import models  # noqa: E402
from dkl_lib.losses import loss_terms  # noqa: E402
from dkl_lib.prior import ClassPrior  # noqa: E402

LOSSES = ("ce", "kl", "dkl", "ikl", "gkl", "dkd")
VARIANTS = LOSSES + ("teacher",)  # "teacher": the resnet32x4's own CE training step
HPARAMS = {
    "kl": {"temperature": 4.0},
    "dkl": {"temperature": 4.0, "alpha": 1.0, "beta": 1.0},
    "ikl": {"temperature": 4.0, "alpha": 1.0, "beta": 1.0, "weight_temperature": 4.0},
    "gkl": {"temperature": 4.0, "alpha": 1.0, "beta": 1.0, "gamma": 0.05, "weight_temperature": 4.0},
    "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0},
}
PRIOR_LOSSES = ("ikl", "gkl")  # the losses with a class prior (GI), updated every step
PRIOR_T_W = HPARAMS["ikl"]["weight_temperature"]  # the prior's weight temperature (ikl's and gkl's)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # MPS runs asynchronously too
        torch.mps.synchronize()


def resolve_settings(device, amp="auto", channels_last="auto"):
    """{"amp": "bf16" or "off", "channels_last": bool}: "auto" means bf16 + channels_last on CUDA
    (as dkl_lib.train does), neither on the CPU."""
    cuda = device.type == "cuda"
    return {"amp": ("bf16" if cuda else "off") if amp == "auto" else amp,
            "channels_last": cuda if channels_last == "auto" else channels_last == "on"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (every call that reaches the Python
    dispatch key: after autograd and the composite decompositions, i.e. what runs a kernel or is a
    view), per phase: set ``phase`` to the name under which the following ops are counted."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops = collections.Counter()
        self.views = collections.Counter()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.phase] += 1
        if func.is_view:
            self.views[self.phase] += 1
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Bench:
    def __init__(self, device, batch, classes=100, seed=0, losses=LOSSES, amp="auto", channels_last="auto",
                 compile=False):
        self.device = device
        self.compiled = compile
        self.cuda = device.type == "cuda"
        self.losses = tuple(losses)
        self.settings = resolve_settings(device, amp, channels_last)
        fmt = torch.channels_last if self.settings["channels_last"] else torch.contiguous_format
        self.teacher = models.build_model("resnet32x4", classes, seed=seed).to(device, memory_format=fmt).eval()
        self.teacher.requires_grad_(False)
        self.student = models.build_model("resnet8x4", classes, seed=seed + 1).to(device, memory_format=fmt)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.prior = ClassPrior(classes, device=device)
        if "teacher" in self.losses:  # a trainable copy of the teacher for its own training step
            self.trainee = models.build_model("resnet32x4", classes, seed=seed).to(device, memory_format=fmt)
            self.trainee_opt = torch.optim.SGD(self.trainee.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        # the forwards: the models themselves, or torch.compile'd wrappers of them (same parameters)
        wrap = torch.compile if compile else (lambda m: m)
        self.teacher_fwd, self.student_fwd = wrap(self.teacher), wrap(self.student)
        self.trainee_fwd = wrap(self.trainee) if "teacher" in self.losses else None

    def autocast(self):
        if self.settings["amp"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, loss):
        if loss == "teacher":
            with self.autocast():
                logits = self.trainee_fwd(self.x)
            self.trainee_opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits.float(), self.y).backward()
            self.trainee_opt.step()
            return
        with self.autocast():
            logits = self.student_fwd(self.x)
            if loss != "ce":
                with torch.no_grad():
                    t_logits = self.teacher_fwd(self.x)
        total = F.cross_entropy(logits.float(), self.y)
        if loss != "ce":
            extra = {}
            if loss in PRIOR_LOSSES:
                extra = {"class_prior": self.prior.prior}
            terms = loss_terms(loss, logits, t_logits, targets=self.y, **HPARAMS[loss], **extra)
            total = total + sum(terms.values())
            if loss in PRIOR_LOSSES:  # before the backward, as dkl_lib.train.distill does
                self.prior._update_checked(t_logits, self.y, weight_temperature=PRIOR_T_W)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def time(self, reps, warmup=1, order_seed=0):
        return round_robin([self], reps, warmup, order_seed=order_seed)[self]


def quartiles(values):
    """(first quartile, third quartile) of a non-empty sequence: linear interpolation between the
    order statistics (numpy's default, statistics.quantiles' "inclusive" method), which is also
    defined for one value (statistics.quantiles wants two before Python 3.13)."""
    data = sorted(values)
    if not data:
        raise ValueError("quartiles of no values")

    def at(q):
        pos = q * (len(data) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (pos - low)

    return at(0.25), at(0.75)


def paired_ratios(samples, reference="kl"):
    """{loss: [per-round ratio]} from {loss: [per-round seconds]}: each round's time of a loss over
    the time of ``reference`` in the same round (so the reference's own ratios are exactly 1.0).
    {} when ``reference`` was not measured."""
    if reference not in samples:
        return {}
    ref = samples[reference]
    return {loss: [t / r for t, r in zip(times, ref)] for loss, times in samples.items()}


def step_ops(bench, loss):
    """aten operators dispatched by one (untimed) step of ``loss``: the models, the losses, the
    backward and the optimizer; what a launch-bound GPU pays for one by one."""
    with OpCounter() as counter:
        bench.step(loss)
    sync(bench.device)
    return sum(counter.ops.values())


def round_robin(benches, reps, warmup=1, order_seed=0):
    """Time one step of each loss of each bench in turn, repeated, so that all are measured side by side.

    Args:
        benches: Bench objects on one device (``--compile both``: the eager and the compiled one).
        reps: timed rounds, >= 1.
        warmup: untimed rounds first, >= 0 (cuDNN autotuning, the allocator, compilation).
        order_seed: the order of the (bench, loss) steps is shuffled in every round, warm-up rounds
            included, by ``random.Random(order_seed)``; None keeps the fixed order (each bench's
            losses in turn, as listed).

    Returns:
        {bench: {loss: median seconds}}, and under string keys: "first": {bench: {loss: seconds of
        the very first step}} (for a compiled bench: the compilation), "ratio_to_kl": {bench: {loss:
        median of the per-round ratios to the same bench's KL step}} and "ratio_to_kl_iqr": {bench:
        {loss: (q1, q3) of those ratios}} (both {} for a bench without "kl"), "samples": {bench:
        {loss: [seconds per round]}}.
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    device = benches[0].device
    steps = [(bench, loss) for bench in benches for loss in bench.losses]
    rng = None if order_seed is None else random.Random(order_seed)

    def order():
        if rng is None:
            return steps
        shuffled = list(steps)
        rng.shuffle(shuffled)
        return shuffled

    def timed(bench, loss):
        sync(device)
        t0 = time.perf_counter()
        bench.step(loss)
        sync(device)
        return time.perf_counter() - t0

    first = {b: {} for b in benches}
    for round_ in range(warmup):  # warm-up (cuDNN autotuning, allocator, compilation)
        for bench, loss in order():
            seconds = timed(bench, loss)
            if round_ == 0:
                first[bench][loss] = seconds
    samples = {b: {loss: [] for loss in b.losses} for b in benches}
    for _ in range(reps):
        for bench, loss in order():
            samples[bench][loss].append(timed(bench, loss))
    out = {b: {loss: statistics.median(v) for loss, v in samples[b].items()} for b in benches}
    ratios = {b: paired_ratios(samples[b]) for b in benches}  # each bench with its own KL step
    out["first"] = {b: {loss: first[b][loss] for loss in b.losses if loss in first[b]} for b in benches}  # as listed
    out["ratio_to_kl"] = {b: {loss: statistics.median(v) for loss, v in ratios[b].items()} for b in benches}
    out["ratio_to_kl_iqr"] = {b: {loss: quartiles(v) for loss, v in ratios[b].items()} for b in benches}
    out["samples"] = samples
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--batch", type=at_least(1), default=64)
    parser.add_argument("--reps", type=int, default=None,
                        help="round-robin repetitions (default 5 CPU, 30 CUDA)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help=f"comma-separated, from {','.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds first (default 1)")
    parser.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                        help="bf16 autocast (auto: on CUDA only, as in training)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="channels_last memory format (auto: on CUDA only, as in training)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="torch.compile the models (both: compiled and eager side by side)")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="seed of the order of the steps, shuffled in every round (default %(default)s)")
    parser.add_argument("--fixed-order", action="store_true",
                        help="keep the fixed order instead (each bench's losses in turn, as listed), for comparison")
    parser.add_argument("--json", default=None, help="also write the medians and the paired ratios to this file")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    order_seed = None if args.fixed_order else args.order_seed
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = sorted(set(losses) - set(VARIANTS))
    if unknown or not losses:
        raise SystemExit(f"--losses: unknown {unknown}; choose from {','.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.devices is not None:
        devices = check_devices(parser, args.devices)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    warmup = max(args.warmup, 2) if True in modes else args.warmup  # compilation and the recompile after it
    results, settings, first_steps, ratio_to_kl, ratio_iqr, ops_per_step = {}, {}, {}, {}, {}, {}
    both = len(modes) > 1
    lines = ["| device | batch | loss | compiled | ms / step | samples / s | time / KL step | aten ops / step |"
             + (" time / eager | first step (compile) |" if both else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if both else "")]
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        reps = args.reps or (30 if device.type == "cuda" else 5)
        benches = [Bench(device, args.batch, losses=losses, amp=args.amp, channels_last=args.channels_last,
                         compile=on) for on in modes]
        timed = round_robin(benches, reps, warmup=warmup, order_seed=order_seed)
        by_mode = {b.compiled: timed[b] for b in benches}
        firsts = {b.compiled: timed["first"][b] for b in benches}
        ratios = {b.compiled: timed["ratio_to_kl"][b] for b in benches}  # each bench paired with its own KL
        iqrs = {b.compiled: timed["ratio_to_kl_iqr"][b] for b in benches}
        # counted after the timing, in one more untimed step each; not in a compiled step (the
        # counting mode would make dynamo trace it anew)
        ops = {b.compiled: {} if b.compiled else {loss: step_ops(b, loss) for loss in b.losses} for b in benches}
        key = lambda on: name + (" compiled" if on else "") if both else name  # noqa: E731
        for on in modes:
            results[key(on)] = by_mode[on]
            first_steps[key(on)] = firsts[on]
            if ops[on]:
                ops_per_step[key(on)] = ops[on]
            if ratios[on]:  # no entry for a device whose run had no KL step to pair with
                ratio_to_kl[key(on)] = ratios[on]
                ratio_iqr[key(on)] = {loss: list(q) for loss, q in iqrs[on].items()}
        settings[name] = {**benches[0].settings, "cudnn_benchmark": device.type == "cuda", "reps": reps,
                          "compile": args.compile, "warmup": warmup, "order_seed": order_seed}
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else name
        if device.type == "cpu":
            label += f" ({torch.get_num_threads()} threads)"
        for loss in losses:
            for on in modes:
                t = by_mode[on][loss]
                ratio = "n/a"
                if ratios[on]:
                    q1, q3 = iqrs[on][loss]
                    ratio = f"{ratios[on][loss]:.2f}x (IQR {q1:.2f}-{q3:.2f})"
                row = (f"| {label} | {args.batch} | {loss} | {'yes' if on else 'no'} | {t * 1e3:.1f} "
                       f"| {args.batch / t:.0f} | {ratio} | {ops[on].get(loss, 'n/a')} |")
                if both:
                    row += (f" {t / by_mode[False][loss]:.2f}x | {firsts[on][loss]:.1f} s |" if on else " 1x | |")
                lines.append(row)
    order = "fixed order" if order_seed is None else f"order shuffled per round (seed {order_seed})"
    print(f"torch {torch.__version__}; resnet32x4 -> resnet8x4, CIFAR-100 shapes, round-robin steps, {order}; "
          "ms / step and samples / s: medians of the step times; time / KL step: median of the per-round "
          "ratios to the KL step of the same round (IQR: their interquartile range)")
    for name, s in settings.items():
        print(f"settings on {name}: autocast {s['amp']}, channels_last {'on' if s['channels_last'] else 'off'}, "
              f"cudnn.benchmark {'on' if s['cudnn_benchmark'] else 'off'}, torch.compile {s['compile']}, "
              f"{s['warmup']} untimed and {s['reps']} timed rounds")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"batch": args.batch, "seconds_per_step": results, "first_step_seconds": first_steps,
                       "settings": settings, "ratio_to_kl": ratio_to_kl, "ratio_to_kl_iqr": ratio_iqr,
                       "ops_per_step": ops_per_step}, fh, indent=2)


if __name__ == "__main__":
    main()
