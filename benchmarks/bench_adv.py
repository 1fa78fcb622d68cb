"""Cost of one adversarial training step, TRADES vs IKL-AT (not a test; prints a table).

    python benchmarks/bench_adv.py                          # CPU (and CUDA when present)
    python benchmarks/bench_adv.py --devices cpu --reps 5 --threads 1
    python benchmarks/bench_adv.py --json out.json

One step = what dkl_lib.train.adversarial_train does per batch: the TRADES inner maximisation
(dkl_lib.attacks.trades_perturb: PGD on KL(f(x) ‖ f(x′)) from x + 0.001·N(0, 1), model in eval
mode, ``--attack-steps`` steps), then in train mode the natural and adversarial forward passes,
the outer loss (dkl_lib.train.adversarial_loss_terms: TRADES = CE + 6·KL; IKL-AT = CE + wMSE +
soft-CE with the class prior, α = 20, β = 4), backward and an SGD step; for IKL-AT also the
class-prior update (GI). Both losses are timed round-robin in one process (one step of each in
turn, in an order shuffled anew every round by ``random.Random(--order-seed)``, warm-up rounds
included), so their ratio is measured side by side: the table reports median step times, and
IKL-AT / TRADES as the median of the per-round ratios of the two steps of the same round (with their
interquartile range in the JSON), as benchmarks/bench_train.py pairs each KD loss with its KL step. The "outer
loss only" columns time just the loss's forward + backward on fixed logits (what differs between
the two). Target: IKL-AT ≤ 1.10× TRADES per step.

``--awp GAMMA`` adds the paper recipe's adversarial weight perturbation
(dkl_lib.train.AdversarialWeightPerturbation: the perturbation's gradient on a proxy copy, add, the
step, remove) as two more variants, "trades+awp" and "ikl+awp", timed in the same round-robin, so
the table also gives AWP's overhead per step and the IKL-AT / TRADES ratio with AWP.

Settings: "digits" = SmallCNN-16 on 1x8x8 inputs, 10 classes, batch 64 (the cpu-quick preset);
"cifar" = PreActResNet-18 on 3x32x32 inputs, 10 classes (batch 128 on CUDA, ``--cifar-batch`` on the
CPU, 16 by default); "cifar100-wrn" = WRN-34-10 at 100 classes, batch 128 (by default on CUDA only).
``--settings cifar:10,cifar100-wrn:5`` picks settings, each with its own attack steps (else
``--attack-steps``): the gpu-short and paper presets' attacks, as benchmarks/gpu_check.sh runs it. On
CUDA the steps run under bf16 autocast with channels_last and ``cudnn.benchmark`` on, as in training
(the warm-up rounds take cuDNN's autotuning).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _args, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _args import at_least, devices as check_devices  # noqa: E402
from bench_train import paired_ratios, quartiles  # noqa: E402
from dkl_lib import models  # noqa: E402
from dkl_lib.attacks import Normalized, bf16_autocast, trades_perturb  # noqa: E402
from dkl_lib.prior import ClassPrior  # noqa: E402
from dkl_lib.train import ADV_DEFAULTS, AdversarialWeightPerturbation, adversarial_loss_terms  # noqa: E402

LOSSES = ("trades", "ikl")
SETTINGS = ("digits", "cifar", "cifar100-wrn")
AWP_VARIANTS = ("trades+awp", "ikl+awp")


def _hparams(loss):
    """The outer loss's default hyper-parameters (``gi`` is a training switch, not a loss argument)."""
    return {k: v for k, v in ADV_DEFAULTS[loss].items() if k != "gi"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # MPS runs asynchronously too
        torch.mps.synchronize()


class Step:
    """One adversarial training step of a fresh model per loss (same initial weights)."""

    def __init__(self, name, model_name, model_kw, shape, classes, batch, device, attack_steps, seed=0, awp=0.0):
        self.device = device
        self.cuda = device.type == "cuda"
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, *shape, generator=g).to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.attack_steps = attack_steps
        self.variants = LOSSES + (AWP_VARIANTS if awp > 0 else ())
        self.models, self.optimizers, self.awp = {}, {}, {}
        for variant in self.variants:
            inner = models.build_model(model_name, classes, seed=seed, **model_kw)
            m = Normalized(inner, [0.5] * shape[0], [0.25] * shape[0]).to(device, memory_format=fmt)
            self.models[variant] = m
            self.optimizers[variant] = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            if variant.endswith("+awp"):
                self.awp[variant] = AdversarialWeightPerturbation(m, gamma=awp)
        self.prior = ClassPrior(classes, device=device)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.name = name
        self.classes = classes
        self.batch = batch
        lg = torch.Generator().manual_seed(seed + 2)
        self.logits = [torch.randn(batch, classes, generator=lg).to(device).requires_grad_(True) for _ in range(2)]

    def step(self, variant):
        model, opt = self.models[variant], self.optimizers[variant]
        loss = variant.split("+")[0]
        x_adv = trades_perturb(model, self.x, epsilon=8 / 255, steps=self.attack_steps, step_size=2 / 255,
                               generator=self.gen, amp=self.cuda)
        extra = {"class_prior": self.prior.prior} if loss == "ikl" else {}

        def outer(m):
            with bf16_autocast(self.device, self.cuda):
                nat, adv = m(self.x), m(x_adv)
            return nat, sum(adversarial_loss_terms(loss, adv, nat, self.y, **_hparams(loss), **extra).values())

        v = None
        if variant in self.awp:
            v = self.awp[variant].perturbation(lambda m: outer(m)[1])
            self.awp[variant].apply(v, +1.0)
        model.train()
        nat, total = outer(model)
        if loss == "ikl":  # before the backward, as dkl_lib.train.adversarial_train does
            self.prior._update_checked(nat.detach(), self.y, weight_temperature=ADV_DEFAULTS["ikl"]["weight_temperature"])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if v is not None:
            self.awp[variant].apply(v, -1.0)

    def loss_only(self, loss):
        adv, nat = self.logits
        extra = {"class_prior": self.prior.prior} if loss == "ikl" else {}
        total = sum(adversarial_loss_terms(loss, adv, nat, self.y, **_hparams(loss), **extra).values())
        total.backward()
        adv.grad = None
        nat.grad = None


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _paired(samples, loss, reference):
    """(median, [q1, q3]) of the per-round ratios of ``loss``'s step to ``reference``'s."""
    ratios = paired_ratios(samples, reference)[loss]
    return statistics.median(ratios), list(quartiles(ratios))


def run(setting: Step, reps: int, warmup: int, loss_reps: int, order_seed: int = 0):
    dev = setting.device
    rng = random.Random(order_seed)

    def order():
        variants = list(setting.variants)
        rng.shuffle(variants)  # no variant always follows the same one
        return variants

    for _ in range(warmup):
        for variant in order():
            setting.step(variant)
        for loss in LOSSES:
            setting.loss_only(loss)
    step_t = {variant: [] for variant in setting.variants}
    loss_t = {loss: [] for loss in LOSSES}
    for _ in range(reps):  # round-robin: one step of each loss (and AWP variant) per round
        for variant in order():
            step_t[variant].append(timed(lambda: setting.step(variant), dev))
    for _ in range(loss_reps):
        for loss in LOSSES:
            loss_t[loss].append(timed(lambda: setting.loss_only(loss), dev))
    med = {k: statistics.median(v) for k, v in step_t.items()}
    lmed = {k: statistics.median(v) for k, v in loss_t.items()}
    ratio, ratio_iqr = _paired(step_t, "ikl", "trades")
    row = {"setting": setting.name, "device": str(dev), "batch": setting.batch, "classes": setting.classes,
           "attack_steps": setting.attack_steps, "trades_ms": 1e3 * med["trades"], "ikl_ms": 1e3 * med["ikl"],
           "ratio": ratio, "ratio_iqr": ratio_iqr, "ratio_of_medians": med["ikl"] / med["trades"],
           "trades_loss_ms": 1e3 * lmed["trades"], "ikl_loss_ms": 1e3 * lmed["ikl"],
           "loss_ratio": lmed["ikl"] / lmed["trades"], "reps": reps, "order_seed": order_seed,
           "cudnn_benchmark": bool(dev.type == "cuda" and torch.backends.cudnn.benchmark)}
    if "trades+awp" in med:
        awp_ratio, awp_ratio_iqr = _paired(step_t, "ikl+awp", "trades+awp")
        row.update({"trades_awp_ms": 1e3 * med["trades+awp"], "ikl_awp_ms": 1e3 * med["ikl+awp"],
                    "awp_ratio": awp_ratio, "awp_ratio_iqr": awp_ratio_iqr,
                    "awp_overhead": _paired(step_t, "trades+awp", "trades")[0]})
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, plus cuda when present)")
    parser.add_argument("--reps", type=at_least(1), default=15, help="timed rounds (medians reported)")
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--loss-reps", type=at_least(1), default=200, help="timed outer-loss-only calls per loss")
    parser.add_argument("--attack-steps", type=at_least(1), default=10)
    parser.add_argument("--cifar-batch", type=at_least(1), default=16, help="PreActResNet-18 batch on the CPU")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--order-seed", type=int, default=0,
                        help="seed of the order of the steps, shuffled in every round (default %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--awp", type=float, default=0.0, metavar="GAMMA",
                        help="also time both losses with adversarial weight perturbation of this size (paper: 0.005)")
    parser.add_argument("--settings", default=None, metavar="NAME[:STEPS],...",
                        help=f"from {','.join(SETTINGS)}, each with its attack steps (default: digits and cifar, "
                             "plus cifar100-wrn on CUDA, all with --attack-steps)")
    args = parser.parse_args(argv)
    chosen = None
    if args.settings:
        chosen = {}
        for item in args.settings.split(","):
            name, _, steps = item.strip().partition(":")
            if name not in SETTINGS or (steps and not steps.isdigit()):
                raise SystemExit(f"--settings: bad item {item!r}; use NAME[:STEPS] with NAME from {','.join(SETTINGS)}")
            chosen[name] = int(steps) if steps else args.attack_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.awp < 0:
        parser.error(f"--awp must be >= 0, got {args.awp}")
    devices = (check_devices(parser, args.devices) if args.devices is not None else
               ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    for name in devices:
        dev = torch.device(name)
        cuda = dev.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # as dkl_lib.train does on CUDA
        big = 128 if cuda else args.cifar_batch
        settings = [("digits", "small_cnn", {"width": 16, "in_channels": 1}, (1, 8, 8), 10, 64),
                    ("cifar", "preact_resnet18", {}, (3, 32, 32), 10, big),
                    ("cifar100-wrn", "wrn_34_10", {}, (3, 32, 32), 100, big)]
        wanted = chosen or {name: args.attack_steps for name in SETTINGS[:3 if cuda else 2]}
        for label, model_name, kw, shape, classes, batch in settings:
            if label not in wanted:
                continue
            step = Step(label, model_name, kw, shape, classes, batch, dev, wanted[label], awp=args.awp)
            reps = args.reps if (cuda or label == "digits") else max(3, args.reps // 3)
            rows.append(run(step, reps, args.warmup, args.loss_reps, args.order_seed))
            r = rows[-1]
            print(f"{r['device']:>5} {r['setting']:>13} B={r['batch']:<4} C={r['classes']:<4} "
                  f"TRADES {r['trades_ms']:8.1f} ms  IKL-AT {r['ikl_ms']:8.1f} ms  ratio {r['ratio']:.3f}x  | "
                  f"outer loss only: {r['trades_loss_ms']:.3f} ms vs {r['ikl_loss_ms']:.3f} ms "
                  f"({r['loss_ratio']:.2f}x)" + (f"  | with AWP: {r['trades_awp_ms']:.1f} vs {r['ikl_awp_ms']:.1f} ms "
                                                f"({r['awp_ratio']:.3f}x; AWP costs {r['awp_overhead']:.2f}x)"
                                                if "awp_ratio" in r else ""), flush=True)
    print()
    print("| device | setting | B | C | attack steps | TRADES step | IKL-AT step | IKL-AT / TRADES | "
          "outer loss only: TRADES | IKL-AT | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['setting']} | {r['batch']} | {r['classes']} | {r['attack_steps']} | "
              f"{r['trades_ms']:.1f} ms | {r['ikl_ms']:.1f} ms | {r['ratio']:.3f}x | {r['trades_loss_ms']:.3f} ms | "
              f"{r['ikl_loss_ms']:.3f} ms | {r['loss_ratio']:.2f}x |")
    if any("awp_ratio" in r for r in rows):
        print()
        print(f"With adversarial weight perturbation (gamma {args.awp}):")
        print("| device | setting | TRADES+AWP step | IKL-AT+AWP step | IKL-AT / TRADES | TRADES+AWP / TRADES |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['device']} | {r['setting']} | {r['trades_awp_ms']:.1f} ms | {r['ikl_awp_ms']:.1f} ms | "
                  f"{r['awp_ratio']:.3f}x | {r['awp_overhead']:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
