"""benchmarks/bench_train.py's paired ratios to the KL step (an order shuffled per round, each loss's
time over the KL time of the same round), gpu_check_summary.py's use of them, and
benchmarks/bench_host.py (the host time and aten ops of each loss call). Quick CPU runs: they check
what the scripts write, not what a machine measures."""
import collections
import importlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _script(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def bench_train(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_train")


@pytest.fixture
def bench_host(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_host")


# ------------------------------------------------------------------ bench_train: round_robin on a fake clock
class _Clock:
    """A fake time.perf_counter: the benches' steps advance it by their cost times the round's scale."""

    def __init__(self, scales):
        self.now, self.scales, self.log = 0.0, scales, []

    def __call__(self):
        return self.now


class _FakeBench:
    """A Bench whose step of ``loss`` in round n (its n-th call of that loss, warm-up rounds counted)
    costs costs[loss] * clock.scales[n] seconds of the fake clock."""

    def __init__(self, clock, costs, name):
        self.device, self.losses, self.costs = torch.device("cpu"), tuple(costs), costs
        self.clock, self.name, self.calls = clock, name, collections.Counter()

    def step(self, loss):
        n = self.calls[loss]
        self.calls[loss] += 1
        self.clock.now += self.costs[loss] * self.clock.scales[n]
        self.clock.log.append((self.name, loss))


def _round_robin(bench_train, monkeypatch, order_seed, reps=8, warmup=2):
    # rounds of very different speed (a GPU clocking down, another process): 1x to 40x
    clock = _Clock([1, 40, 3, 0.5, 17, 2, 9, 1.5, 25, 4])
    monkeypatch.setattr(bench_train, "time", types.SimpleNamespace(perf_counter=clock))
    eager = _FakeBench(clock, {"ce": 1.0, "kl": 2.0, "ikl": 2.5, "dkd": 3.0}, "eager")
    compiled = _FakeBench(clock, {"kl": 1.0, "ikl": 1.5}, "compiled")  # --compile both: its own KL
    out = bench_train.round_robin([eager, compiled], reps, warmup=warmup, order_seed=order_seed)
    return out, eager, compiled, clock


def test_round_robin_pairs_each_loss_with_the_kl_step_of_its_own_round_and_bench(bench_train, monkeypatch):
    out, eager, compiled, clock = _round_robin(bench_train, monkeypatch, order_seed=0)
    # the rounds' speeds differ 80-fold, yet every per-round ratio is the cost ratio: the IQR is a point
    for bench, expected in ((eager, {"ce": 0.5, "kl": 1.0, "ikl": 1.25, "dkd": 1.5}),
                            (compiled, {"kl": 1.0, "ikl": 1.5})):
        assert out["ratio_to_kl"][bench] == pytest.approx(expected)
        iqr = out["ratio_to_kl_iqr"][bench]
        assert set(iqr) == set(expected)
        for loss, r in expected.items():
            assert iqr[loss] == pytest.approx((r, r)), loss
        assert out["ratio_to_kl"][bench]["kl"] == 1.0  # exactly: the KL time over itself
        assert [len(v) for v in out["samples"][bench].values()] == [8] * len(expected)
    # medians of the times are kept as they were: the timed rounds are 2..9 (scales 3, 0.5, 17, 2, 9, 1.5, 25, 4)
    assert out[eager]["kl"] == pytest.approx(2.0 * 3.5) and out[compiled]["ikl"] == pytest.approx(1.5 * 3.5)
    assert out["first"][eager] == pytest.approx({"ce": 1.0, "kl": 2.0, "ikl": 2.5, "dkd": 3.0})
    assert list(out["first"][eager]) == ["ce", "kl", "ikl", "dkd"]  # as listed, whatever ran first


def test_round_robin_shuffles_the_order_of_every_round_reproducibly(bench_train, monkeypatch):
    steps = 6  # 4 eager + 2 compiled steps per round
    _, _, _, clock = _round_robin(bench_train, monkeypatch, order_seed=0)
    rounds = [tuple(clock.log[i:i + steps]) for i in range(0, len(clock.log), steps)]
    assert len(rounds) == 10 and all(sorted(r) == sorted(rounds[0]) for r in rounds)  # each step once per round
    assert len(set(rounds)) > 5  # the order changes from round to round, warm-up rounds included
    assert len({r[:2] for r in rounds}) > 1  # KL does not always follow the same step
    _, _, _, again = _round_robin(bench_train, monkeypatch, order_seed=0)
    assert again.log == clock.log  # seeded: the same order again
    _, _, _, other = _round_robin(bench_train, monkeypatch, order_seed=1)
    assert other.log != clock.log
    _, _, _, fixed = _round_robin(bench_train, monkeypatch, order_seed=None)  # --fixed-order
    old = [("eager", "ce"), ("eager", "kl"), ("eager", "ikl"), ("eager", "dkd"), ("compiled", "kl"),
           ("compiled", "ikl")]
    assert fixed.log == old * 10


def test_round_robin_without_kl_and_bad_counts(bench_train, monkeypatch):
    clock = _Clock([1.0] * 4)
    monkeypatch.setattr(bench_train, "time", types.SimpleNamespace(perf_counter=clock))
    bench = _FakeBench(clock, {"ce": 1.0, "ikl": 2.0}, "eager")
    out = bench_train.round_robin([bench], 3)
    assert out["ratio_to_kl"][bench] == {} and out["ratio_to_kl_iqr"][bench] == {}  # nothing to pair with
    assert out[bench] == pytest.approx({"ce": 1.0, "ikl": 2.0})
    for reps, warmup, message in [(0, 1, "reps must be an integer >= 1"), (2, -1, "warmup must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            bench_train.round_robin([bench], reps, warmup=warmup)


def test_quartiles_match_numpy_and_take_one_value(bench_train):
    import numpy as np

    assert bench_train.quartiles([1.7]) == (1.7, 1.7)
    assert bench_train.quartiles([5, 1, 4, 2, 3]) == (2, 4)
    values = list(np.random.default_rng(0).normal(size=13))
    assert bench_train.quartiles(values) == pytest.approx(tuple(np.percentile(values, [25, 75])))
    with pytest.raises(ValueError, match="no values"):
        bench_train.quartiles([])


def test_bench_train_writes_the_paired_ratios(tmp_path):
    """A real (tiny) CPU run: the new keys beside the old ones, every ratio positive and finite, KL's
    own exactly 1, the median inside its IQR, and the table saying what its ratio column is."""
    out = tmp_path / "train.json"
    proc = _script(BENCH / "bench_train.py", "--devices", "cpu", "--batch", "2", "--reps", "3", "--threads", "1",
                   "--losses", "ce,kl,ikl,dkd", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text(encoding="utf-8"))
    assert set(run) == {"batch", "seconds_per_step", "first_step_seconds", "settings", "ratio_to_kl",
                        "ratio_to_kl_iqr", "ops_per_step"}
    ops = run["ops_per_step"]["cpu"]  # whole steps: CE-only < KL < the decoupled and DKD steps
    assert ops["ce"] < ops["kl"] < min(ops["ikl"], ops["dkd"])
    assert f"| {ops['ikl']} |" in proc.stdout
    assert list(run["seconds_per_step"]["cpu"]) == ["ce", "kl", "ikl", "dkd"]
    ratios, iqr = run["ratio_to_kl"]["cpu"], run["ratio_to_kl_iqr"]["cpu"]
    assert set(ratios) == set(iqr) == {"ce", "kl", "ikl", "dkd"}
    assert ratios["kl"] == 1.0 and iqr["kl"] == [1.0, 1.0]
    for loss, r in ratios.items():
        assert math.isfinite(r) and r > 0, (loss, r)
        assert 0 < iqr[loss][0] <= r <= iqr[loss][1] and math.isfinite(iqr[loss][1]), (loss, r, iqr[loss])
    assert run["settings"]["cpu"]["order_seed"] == 0 and run["settings"]["cpu"]["reps"] == 3
    assert "time / KL step: median of the per-round ratios to the KL step of the same round" in proc.stdout
    assert "order shuffled per round (seed 0)" in proc.stdout
    assert "| cpu (1 threads) | 2 | kl | no |" in proc.stdout and "| 1.00x (IQR 1.00-1.00) |" in proc.stdout


def test_bench_train_refuses_no_rounds():
    proc = _script(BENCH / "bench_train.py", "--devices", "cpu", "--reps", "0", timeout=60)
    assert proc.returncode == 2 and "--reps must be >= 1" in proc.stderr


# ------------------------------------------------------------------ gpu_check_summary: paired ratios
def _summary(tmp_path, runs):
    (tmp_path / "steps.txt").write_text("".join(f"ok|training step, batch {r['batch']}\n" for r in runs),
                                        encoding="utf-8")
    for r in runs:
        (tmp_path / f"train_b{r['batch']}.json").write_text(json.dumps(r), encoding="utf-8")
    proc = _script(BENCH / "gpu_check_summary.py", tmp_path, "cpu", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    targets = {t["target"]: t for t in bundle["targets"]}
    return proc.stdout, targets


def test_gpu_check_summary_uses_the_paired_ratios_and_falls_back_for_old_files(tmp_path):
    """The medians alone would put ikl at 1.20x of KL; the paired per-round ratios at 1.05x: the
    table and the 1.10x target use the paired one, with its IQR. A file from before the paired ratios
    (batch 128 here) still gives the median-over-median ratio, without an IQR."""
    settings = {"cpu": {"amp": "bf16", "channels_last": True, "cudnn_benchmark": False, "reps": 10,
                        "compile": "off", "warmup": 1}}
    new = {"batch": 64, "seconds_per_step": {"cpu": {"kl": 0.010, "ikl": 0.012, "teacher": 0.020}},
           "first_step_seconds": {}, "settings": {"cpu": {**settings["cpu"], "order_seed": 0}},
           "ratio_to_kl": {"cpu": {"kl": 1.0, "ikl": 1.05, "teacher": 2.0}},
           "ratio_to_kl_iqr": {"cpu": {"kl": [1.0, 1.0], "ikl": [1.02, 1.08], "teacher": [1.9, 2.1]}},
           "ops_per_step": {"cpu": {"kl": 460, "ikl": 485, "teacher": 610}}}
    old = {"batch": 128, "seconds_per_step": {"cpu": {"kl": 0.010, "ikl": 0.012}}, "first_step_seconds": {},
           "settings": settings}
    stdout, targets = _summary(tmp_path, [new, old])
    assert "| 64 | ikl | 12.00 | 5,333 | 1.05x (IQR 1.02-1.08) | 485 |" in stdout
    assert "| 64 | kl | 10.00 | 6,400 | 1.00x (IQR 1.00-1.00) |" in stdout
    assert "| 64 | teacher | 20.00 | 3,200 | 2.00x (IQR 1.90-2.10) |" in stdout
    assert "| 128 | ikl | 12.00 | 10,667 | 1.20x | n/a |" in stdout  # no op count in the old file
    assert "median of the per-round paired ratios" in stdout
    new_target = targets["ikl step within 1.10x of the KL step at batch 64"]
    assert new_target["met"] is True and new_target["value"] == "1.05x (IQR 1.02-1.08)"
    old_target = targets["ikl step within 1.10x of the KL step at batch 128"]
    assert old_target["met"] is False and old_target["value"] == "1.20x"


# ------------------------------------------------------------------ bench_host
def test_bench_host_counts_ops_and_pairs_with_kl(tmp_path):
    out = tmp_path / "host.json"
    proc = _script(BENCH / "bench_host.py", "--rounds", "20", "--warmup", "2", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text(encoding="utf-8"))
    res = run["losses"]
    assert list(res) == ["kl", "dkl", "ikl", "gkl", "dkd"]
    assert run["threads"] == 1 and run["batch"] == 8 and run["classes"] == 100 and run["device"] == "cpu"
    assert run["hparams"]["dkd"] == {"temperature": 4.0, "alpha": 1.0, "beta": 8.0}  # bench_train's HPARAMS
    for loss, r in res.items():
        assert r["ops"] > 0 and r["ops"] == r["ops_detail"]["total"], (loss, r)
        assert r["ops_detail"]["forward"] > 0 and r["ops_detail"]["backward"] > 0, (loss, r)
        assert sum(r["ops_detail"]["by_op"].values()) == r["ops"]
        for key in ("us", "ratio_to_kl"):
            assert math.isfinite(r[key]) and r[key] > 0, (loss, key, r[key])
        assert r["ratio_to_kl_iqr"][0] <= r["ratio_to_kl"] <= r["ratio_to_kl_iqr"][1]
        # the class-prior update counts for the losses with a prior, and only for them
        assert (r["ops_detail"]["prior"] > 0) == (loss in ("ikl", "gkl")), (loss, r["ops_detail"])
    assert res["kl"]["ratio_to_kl"] == 1.0 and res["kl"]["extra_us"] == 0.0
    assert res["dkd"]["ops"] > res["kl"]["ops"]
    assert "aten.index_add_.default" in res["ikl"]["ops_detail"]["by_op"]  # the prior's accumulation
    assert "| loss | aten ops / call | host us / call | extra us over KL | time / KL |" in proc.stdout
    assert "device cpu; 1 thread(s); B = 8, C = 100, float32" in proc.stdout
    assert f"| kl | {res['kl']['ops']} |" in proc.stdout and "| +0.0 | 1.00x (IQR 1.00-1.00) |" in proc.stdout


def test_bench_host_measure_reference_and_bad_arguments(bench_host):
    """kl, the reference of the ratios, is measured even when not asked for; bad arguments are refused
    with the argument named (in-process, on the default thread count: measure does not set it)."""
    res = bench_host.measure("cpu", ["dkd"], batch=2, classes=5, rounds=3, warmup=1)
    assert list(res) == ["kl", "dkd"] and res["kl"]["ratio_to_kl"] == 1.0
    for kwargs, message in [({"losses": ["kld"]}, r"unknown losses \['kld'\]"),
                            ({"rounds": 0}, "rounds must be an integer >= 1"),
                            ({"warmup": -1}, "warmup must be an integer >= 0"),
                            ({"batch": 0}, "batch must be an integer >= 1"),
                            ({"classes": 1}, "classes must be an integer >= 2")]:
        with pytest.raises(ValueError, match=message):
            bench_host.measure("cpu", **{"rounds": 1, "warmup": 0, **kwargs})


def test_bench_host_command_line_refuses_bad_arguments():
    proc = _script(BENCH / "bench_host.py", "--rounds", "0", timeout=60)
    assert proc.returncode == 2 and "rounds must be an integer >= 1" in proc.stderr
    proc = _script(BENCH / "bench_host.py", "--threads", "0", timeout=60)
    assert proc.returncode == 2 and "--threads must be >= 1" in proc.stderr
    if not torch.cuda.is_available():
        proc = _script(BENCH / "bench_host.py", "--device", "cuda", timeout=60)
        assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr


def test_gpu_check_summary_shows_the_compiled_step_of_bench_train_compile_both(bench_train, monkeypatch, tmp_path):
    """bench_train.py --compile both (torch.compile stubbed by the identity: the file's format, not a
    compilation) read by gpu_check_summary.py: per loss the eager and the compiled step, compiled / eager,
    the first compiled step, and the compiled step's paired ratio to the compiled KL step; no table
    (and no error) without the file."""
    (tmp_path / "steps.txt").write_text("ok|compiled training step\n", encoding="utf-8")
    proc = _script(BENCH / "gpu_check_summary.py", tmp_path, "cpu", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Compiled training step" not in proc.stdout
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    out = tmp_path / "train_compiled.json"
    threads = torch.get_num_threads()
    try:
        bench_train.main(["--devices", "cpu", "--batch", "2", "--reps", "2", "--threads", "1", "--losses", "kl,ikl",
                          "--compile", "both", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    run = json.loads(out.read_text(encoding="utf-8"))
    sec, first = run["seconds_per_step"], run["first_step_seconds"]
    assert set(sec) == {"cpu", "cpu compiled"} and list(sec["cpu compiled"]) == ["kl", "ikl"]
    proc = _script(BENCH / "gpu_check_summary.py", tmp_path, "cpu", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Compiled training step (torch.compile of teacher and student" in proc.stdout
    for loss in ("kl", "ikl"):
        eager, comp = sec["cpu"][loss], sec["cpu compiled"][loss]
        q1, q3 = run["ratio_to_kl_iqr"]["cpu compiled"][loss]
        row = (f"| {loss} | {eager * 1e3:.2f} | {comp * 1e3:.2f} | {comp / eager:.2f}x "
               f"| {first['cpu compiled'][loss]:.1f} s | {run['ratio_to_kl']['cpu compiled'][loss]:.2f}x "
               f"(IQR {q1:.2f}-{q3:.2f}) |")
        assert row in proc.stdout, (row, proc.stdout)
    assert "| kl |" in proc.stdout and "| 1.00x (IQR 1.00-1.00) |" in proc.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))["train_compiled"] == run


# ------------------------------------------------------------------ bench_adv: paired, shuffled rounds
def test_bench_adv_pairs_each_round_and_shuffles_the_order(monkeypatch):
    """IKL-AT / TRADES used to be median over median with the steps in a fixed order (trades, ikl,
    trades+awp, ikl+awp every round), the position effect bench_train removed; now each round's ratio
    of the two steps, in an order shuffled per round, with the interquartile range."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench_adv = importlib.import_module("bench_adv")
    base = {"trades": 1.0, "ikl": 1.04, "trades+awp": 1.3, "ikl+awp": 1.3 * 1.02}
    calls, rounds = [], iter(range(10 ** 6))
    state = {"slow": 1.0}

    class FakeStep:
        name, batch, classes, attack_steps = "cifar", 128, 10, 10
        device = torch.device("cpu")
        variants = tuple(base)

        def step(self, variant):
            calls.append(variant)

        def loss_only(self, loss):
            pass

    def fake_timed(fn, device):
        fn()
        variant = calls[-1]
        if len(calls) % 4 == 1:  # a new round: the machine is faster or slower for all four steps
            state["slow"] = 1.0 + (next(rounds) % 5)
        return base[variant] * state["slow"]

    monkeypatch.setattr(bench_adv, "timed", fake_timed)
    row = bench_adv.run(FakeStep(), reps=9, warmup=0, loss_reps=1, order_seed=3)
    assert row["ratio"] == pytest.approx(1.04) and row["ratio_iqr"] == pytest.approx([1.04, 1.04])
    assert row["awp_ratio"] == pytest.approx(1.02) and row["awp_overhead"] == pytest.approx(1.3)
    orders = {tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)}
    assert len(orders) > 1 and all(sorted(o) == sorted(base) for o in orders)
    assert row["order_seed"] == 3 and row["cudnn_benchmark"] is False


@pytest.mark.parametrize("script,args,needle", [
    ("bench_train.py", ["--threads", "-1"], "--threads: must be an integer >= 1, got -1"),
    ("bench_train.py", ["--batch", "0"], "--batch: must be an integer >= 1, got 0"),
    ("bench_train.py", ["--devices", "gpu"], "--devices: unknown device 'gpu'"),
    ("bench_adv.py", ["--reps", "0"], "--reps: must be an integer >= 1, got 0"),
    ("bench_adv.py", ["--awp", "-0.1"], "--awp must be >= 0"),
    ("bench_losses.py", ["--threads", "0"], "--threads: must be an integer >= 1, got 0"),
    ("bench_imagenet_decode.py", ["--workers", "x"], "--workers: must be an integer >= 1, got 'x'"),
    ("bench_imagenet_decode.py", ["--rounds", "0"], "--rounds: must be an integer >= 1, got 0"),
])
def test_benchmark_scripts_refuse_bad_options_in_one_line(script, args, needle):
    """Each of these was a traceback from torch or statistics (StatisticsError: no median for empty data,
    RuntimeError: set_num_threads expects a positive integer, ...) or, for --threads 0, silently ignored."""
    proc = _script(BENCH / script, *args)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
