"""Portability: what a Mac (Apple MPS) or Windows user meets, checked on Linux CPU.

``fake_mps`` makes "mps" a device of this machine: ``torch.backends.mps.is_available()`` is True
(CUDA off), and a torch-function mode runs every tensor sent to "mps" on the CPU while keeping
MPS's rules: such a tensor reports ``device.type == "mps"``, its results stay on "mps", and a
float64 result there raises MPS's own ``TypeError`` (MPS has no float64), as ``.numpy()`` of one
does. Copying to the CPU (``.cpu()``, ``.to("cpu")``) leaves "mps". Code that works under it does
not use float64 on the auto-selected device.
"""
from __future__ import annotations

import functools
import math
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import dkl_lib as dkl

MPS_FLOAT64 = ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
               "float64. Please use float32 instead.")


def _is_mps(device) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "mps"
    return isinstance(device, torch.device) and device.type == "mps"


def _is_cpu(device) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "cpu"
    return isinstance(device, torch.device) and device.type == "cpu"


class FakeMPS(TorchFunctionMode):
    """Tensors on "mps" live on the CPU, marked; float64 among them raises as on a Mac."""

    def __init__(self):
        super().__init__()
        self._marked = {}
        self.float64_refused = 0

    def marked(self, t) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, t) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def _unmark(self, t) -> None:
        self._marked.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if owner is torch.Tensor.device and name == "__get__":
            return torch.device("mps", 0) if self.marked(args[0]) else func(*args, **kwargs)
        if owner is torch.Tensor.data and name == "__set__":  # Module.to: param.data = moved
            out = func(*args, **kwargs)
            (self._mark if self.marked(args[1]) else self._unmark)(args[0])
            return out
        if func is torch._C._nn._parse_to:  # Module.to parsing its arguments: keep "mps"
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and self.marked(args[0]):
            raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        target = None  # "mps", "cpu" or None (where the inputs are)
        if func is torch.Tensor.to:
            rest = args[1:]
            if rest and isinstance(rest[0], torch.Tensor):  # .to(other)
                other = rest[0]
                target = "mps" if self.marked(other) else "cpu" if other.device.type == "cpu" else None
                args, kwargs = (args[0],), {"dtype": other.dtype, **kwargs}
            else:
                device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
                if device is not None:
                    target = "mps" if _is_mps(device) else "cpu" if _is_cpu(device) else None
                new = {"non_blocking": non_blocking}
                if device is not None:
                    new["device"] = "cpu" if target == "mps" else device
                if dtype is not None:
                    new["dtype"] = dtype
                if memory_format is not None:
                    new["memory_format"] = memory_format
                args, kwargs = (args[0],), new
        elif func is torch.Tensor.cpu:
            target = "cpu"
        elif "device" in kwargs and kwargs["device"] is not None:
            if _is_mps(kwargs["device"]):
                if isinstance(kwargs.get("generator"), torch.Generator):  # a CPU generator, as on a Mac
                    raise RuntimeError("Expected a 'mps' device type for generator but found 'cpu'")
                target, kwargs["device"] = "mps", "cpu"
            elif _is_cpu(kwargs["device"]):
                target = "cpu"
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if target is not None and args and out is args[0] and self.marked(out) != (target == "mps"):
            out = out.clone()  # a move between CPU and "mps" is a new tensor, as on a Mac
        on_mps = target == "mps" or (target is None and any(self.marked(t) for t in inputs))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if on_mps:
                if t.dtype in (torch.float64, torch.complex128):
                    self.float64_refused += 1
                    raise TypeError(MPS_FLOAT64)
                self._mark(t)
            elif target == "cpu":
                self._unmark(t)
        return out


@pytest.fixture
def fake_mps(monkeypatch):
    """A machine whose best device is MPS (see the module docstring); yields the mode."""
    # wrapped: torch._dynamo, imported by the optimizers, reads is_available.__wrapped__
    monkeypatch.setattr(torch.cuda, "is_available", functools.wraps(torch.cuda.is_available)(lambda: False))
    monkeypatch.setattr(torch.backends.mps, "is_available",
                        functools.wraps(torch.backends.mps.is_available)(lambda: True))
    mode = FakeMPS()
    with mode:
        yield mode


# ------------------------------------------------------------------------------- the harness itself
def test_fake_mps_behaves_like_mps(fake_mps):
    """The harness refuses what MPS refuses and allows what it allows (so the tests below can fail)."""
    assert dkl.train.select_device().type == "mps"
    x = torch.ones(3).to("mps")
    assert x.device.type == "mps" and (x * 2).device.type == "mps"
    with pytest.raises(TypeError, match="float64"):
        x.double()
    with pytest.raises(TypeError, match="float64"):
        torch.zeros((), device="mps", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        torch.ones(2, dtype=torch.float64).to("mps")
    with pytest.raises(TypeError, match="float64"):
        torch.nn.Linear(2, 2).double().to("mps")
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    with pytest.raises(RuntimeError, match="generator"):
        torch.rand(2, generator=torch.Generator(), device="mps")
    # allowed: a CPU float64 tensor cast on the way (MPS casts on the host first), and the way back
    y = torch.ones(2, dtype=torch.float64).to("mps", torch.float32)
    assert y.device.type == "mps" and y.dtype == torch.float32
    assert x.cpu().double().device.type == "cpu"
    assert x.to("cpu", torch.float32).double().sum().item() == 3.0
    model = torch.nn.Linear(2, 2).to("mps")
    assert model.weight.device.type == "mps" and model(y).device.type == "mps"
    conv = torch.nn.Conv2d(1, 1, 1).to(device=torch.device("mps"), memory_format=torch.channels_last)
    assert all(p.device.type == "mps" for p in conv.parameters())


# ------------------------------------------------------------------------- the library on "mps"
from dkl_lib import attacks as A  # noqa: E402
from dkl_lib import data as D  # noqa: E402
from dkl_lib import models as M  # noqa: E402
from dkl_lib import train as T  # noqa: E402


def _tiny(**kw):
    args = dict(n_train=40, n_test=24, num_classes=4, image_shape=(1, 6, 6), noise=0.3, seed=0)
    return D.synthetic(**{**args, **kw})


def _on_mps(model) -> bool:
    return all(p.device.type == "mps" for p in model.parameters())


def test_training_on_auto_selected_mps_uses_no_float64(fake_mps):
    """A Mac picks MPS by itself; the teacher, then KD with the class prior (GI), train there
    (epoch sums, accuracy counts and the prior's sums used float64 on the device before)."""
    d = _tiny()
    teacher = M.build_model("small_cnn", 4, seed=0, width=4)
    res = T.train_teacher(teacher, d, epochs=2, batch_size=16, progress=False)
    assert res.config["device"] == "mps" and _on_mps(teacher) and res.epochs_run == 2
    student = M.build_model("mlp", 4, seed=1, in_shape=(1, 6, 6), hidden=(8,))
    out = T.distill(student, teacher, d, loss="ikl", gi=True, epochs=2, batch_size=16, progress=False)
    assert out.config["device"] == "mps" and _on_mps(student)
    assert all(math.isfinite(h["loss"]) and 0 <= h["test_acc"] <= 100 for h in out.history)
    assert len(out.priors) == 3 and torch.allclose(out.priors[-1].sum(1), torch.ones(4), atol=1e-5)
    assert fake_mps.float64_refused == 0


def test_mps_run_numbers_match_the_cpu_run(fake_mps):
    """The same run on "mps" (float32 sums) and on the CPU (float64 sums): the same history."""
    d = _tiny()
    runs = []
    for device in ("mps", "cpu"):
        model = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
        runs.append(T.train_teacher(model, d, epochs=2, batch_size=16, progress=False, device=device).history)
    for a, b in zip(*runs):
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_adversarial_training_and_evaluation_on_mps(fake_mps):
    """IKL-AT with GI, AWP and the weight average, then the robustness evaluation with the ART
    ensemble: ART runs on CUDA or the CPU only and moves the model it is given, so on MPS it gets a
    CPU copy and the caller's model stays on MPS."""
    d = _tiny()
    model = A.normalized(M.build_model("small_cnn", 4, seed=0, width=4), d)
    res = T.adversarial_train(model, d, loss="ikl", epsilon=0.1, epochs=1, batch_size=16, attack_steps=2,
                              eval_samples=12, eval_steps=2, progress=False, awp_gamma=0.005, weight_average=0.9)
    assert res.config["device"] == "mps" and _on_mps(model)
    assert math.isfinite(res.history[-1]["test_robust_acc"])
    x, y = d.x_test[:12].to("mps"), d.y_test[:12].to("mps")
    report = A.evaluate_robustness(model, x, y, epsilon=0.1, pgd_steps=(2, 3), apgd_iters=2, square_queries=5,
                                   ensemble_attacks=("apgd-ce",), strict=False)
    assert _on_mps(model)
    assert 0 <= report.robust_acc <= report.clean_acc <= 100
    assert fake_mps.float64_refused == 0


def test_float64_models_stay_off_mps(fake_mps):
    """MPS has no float64: the automatic choice puts a float64 model on the CPU (with a warning);
    asking for "mps" with one is a clear error, not MPS's TypeError halfway through."""
    with pytest.warns(UserWarning, match="float64"):
        assert T.select_device(dtype=torch.float64).type == "cpu"
    assert T.select_device(dtype=torch.float32).type == "mps"
    with pytest.raises(ValueError, match="float64"):
        T.select_device("mps", dtype=torch.float64)
    d = _tiny(dtype=torch.float64)
    model = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,)).double()
    with pytest.warns(UserWarning, match="float64"):
        res = T.train_teacher(model, d, epochs=1, batch_size=16, progress=False)
    assert res.config["device"] == "cpu" and res.config["dtype"] == "float64"
    with pytest.raises(ValueError, match="float64"):
        T.train_teacher(model, d, epochs=1, batch_size=16, progress=False, device="mps")
    student = M.build_model("mlp", 4, seed=1, in_shape=(1, 6, 6), hidden=(8,))  # float32, teacher float64
    with pytest.raises(ValueError, match="float64"):
        T.distill(student, model, d, loss="kl", epochs=1, batch_size=16, progress=False, device="mps")
    with pytest.warns(UserWarning, match="float64"):
        res = T.distill(student, model, d, loss="kl", epochs=1, batch_size=16, progress=False)
    assert res.config["device"] == "cpu" and not _on_mps(student)
    from dkl_lib import experiments as E
    cfg = E.resolve_config("cpu-quick", {"student.dtype": "float64", "teacher.dtype": "float64"})
    assert E._widest_dtype(cfg) == torch.float64
    assert E._widest_dtype(E.resolve_config("cpu-quick")) == torch.float32


def test_float64_helpers_accept_mps_tensors(fake_mps):
    """The float64 checks and metrics of the notebooks work on the CPU when handed MPS tensors."""
    from dkl_lib import analysis, grads

    g = torch.Generator().manual_seed(0)
    o_n, o_m = torch.randn(4, 5, generator=g).to("mps"), torch.randn(4, 5, generator=g).to("mps")
    errors = grads.check_kl_dkl_equivalence(o_n, o_m, temperature=2.0)
    assert max(errors.values()) < 1e-6  # float32 inputs, compared in float64
    assert len(grads.stop_gradient_ablation(o_n, o_m, temperature=2.0)) > 0
    targets = torch.tensor([0, 1, 1, 3]).to("mps")
    weights = grads.weight_matrices(o_m, targets, weight_temperature=2.0, sample=1)
    assert torch.allclose(weights["p_class"].sum(), torch.tensor(1.0, dtype=torch.float64))
    probs = torch.softmax(o_n, 1)
    assert analysis.reliability_table(probs, targets, n_bins=4)["count"].sum() == 4
    assert 0 <= analysis.expected_calibration_error(probs, targets) <= 1
    assert analysis.intra_class_spread(probs, targets) >= 0
    x = _tiny().x_test[:8]
    assert A.class_separation(x.to("mps"), torch.arange(8).remainder(4).to("mps")) == \
        A.class_separation(x, torch.arange(8).remainder(4))
    assert fake_mps.float64_refused == 0


# ------------------------------------------------------------------- Windows: text files and consoles
import ast  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _text_io_without_encoding(path: Path):
    """(line, call) of every text-mode open()/read_text()/write_text() that leaves the encoding to
    the locale (cp1252 on Windows, where a "±" or "ε" then raises or turns into mojibake)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if isinstance(func, ast.Attribute) and (owner == "self" or (
                isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
                and func.value.func.id == "super")):
            continue  # a method of the class itself (a widget's comm: self.open(), super().open()), not a file
        if name in ("read_text", "write_text") and isinstance(func, ast.Attribute):
            found.append((node.lineno, name))
        elif name in ("open", "fdopen") and owner not in ("Image", "tarfile", "zipfile", "gzip") and \
                not (owner == "os" and name == "open"):  # os.open: a descriptor
            builtin = isinstance(func, ast.Name) or owner in ("io", "builtins", "os")
            pos = 1 if builtin else 0  # Path.open(mode)
            mode = node.args[pos].value if len(node.args) > pos and isinstance(node.args[pos], ast.Constant) else "r"
            mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)),
                        mode)
            if "b" not in str(mode):
                found.append((node.lineno, f"{name}({mode!r})"))
    return found


def test_scanner_finds_a_missing_encoding(tmp_path):
    src = tmp_path / "x.py"
    src.write_text('open(p, "w")\nopen(p, "rb")\nPath(p).read_text()\nPath(p).write_text(s, encoding="utf-8")\n'
                   'os.fdopen(fd, "wb")\nos.open(p, 0)\nwith open(p) as fh: pass\n'
                   'self.open()\nsuper().open()\npath.open()\n', encoding="utf-8")
    assert sorted(line for line, _ in _text_io_without_encoding(src)) == [1, 3, 7, 10]


@pytest.mark.parametrize("folder", ["dkl_lib", "benchmarks"])
def test_every_text_file_names_its_encoding(folder):
    """Every file the library and the benchmarks read or write as text names its encoding (the
    configs and data/paper_results.json hold ε, ±, T², →)."""
    missing = [f"{path.relative_to(REPO)}:{line}: {call}" for path in sorted((REPO / folder).glob("*.py"))
               for line, call in _text_io_without_encoding(path)]
    assert not missing, "text I/O without encoding=:\n" + "\n".join(missing)


def _python(code: str, *flags: str, env=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    env.pop("PYTHONUTF8", None)
    return subprocess.run([sys.executable, *flags, *code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=env, timeout=timeout, cwd=REPO)


def test_configs_and_paper_numbers_read_without_the_locale_encoding():
    """Every shipped config file and the paper's numbers load with the locale's encoding out of the
    picture (-X warn_default_encoding + EncodingWarning as an error: what runs on Windows)."""
    code = ("import warnings; import dkl_lib as dkl; from dkl_lib import configs, experiments; "
            "warnings.simplefilter('error', EncodingWarning); "
            "cfgs = [configs.load_config(p) for p in configs.list_configs()]; "
            "assert len(experiments.paper_results(as_frame=False)['results']) > 0; print('ok', len(cfgs))")
    assert not all(p.read_bytes().isascii() for p in (REPO / "configs").glob("*.yaml"))  # so it can fail
    done = _python(["-c", code], "-X", "warn_default_encoding")
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_command_line_prints_to_a_cp1252_console(tmp_path):
    """Windows with output redirected (a file, a pipe, CI logs) encodes stdout in cp1252, which has
    no ε: the command line writes an escape instead of dying with UnicodeEncodeError."""
    out = tmp_path / "\u03b5-runs"
    done = _python(["-m", "dkl_lib.configs", str(REPO / "configs" / "kd_cifar100_resnet32x4_resnet8x4.yaml"),
                    "--out", str(out)], env={"PYTHONIOENCODING": "cp1252"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\\u03b5-runs" in done.stdout and "dkl_lib.experiments" in done.stdout


# ------------------------------------------------------------------ Windows: replacing an open file
def _flaky_replace(monkeypatch, failures: int):
    """os.replace failing ``failures`` times with PermissionError (Windows while another program
    holds the file open), then renaming; returns the list of attempts."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) <= failures:
            raise PermissionError(13, "Access is denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_writes_wait_for_a_file_held_open_on_windows(tmp_path, monkeypatch):
    from dkl_lib import distributed, experiments

    monkeypatch.setattr(distributed, "_RETRY_REPLACE", True)
    calls = _flaky_replace(monkeypatch, 2)
    experiments._atomic_write(tmp_path / "results.json", b'{"a": 1}')
    assert (tmp_path / "results.json").read_bytes() == b'{"a": 1}' and len(calls) == 3
    calls = _flaky_replace(monkeypatch, 2)
    distributed.save_checkpoint(tmp_path / "checkpoint-1.pt", {"x": torch.ones(2)})
    assert distributed.load_latest_checkpoint(tmp_path).state["x"].tolist() == [1.0, 1.0] and len(calls) == 3
    # held open for good: a PermissionError that says what to do, and no temporary file left behind
    _flaky_replace(monkeypatch, 10 ** 6)
    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)
    with pytest.raises(PermissionError, match="another program keeps it open"):
        experiments._atomic_write(tmp_path / "results.csv", b"loss\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pt", "results.json"]


def test_atomic_writes_do_not_retry_elsewhere(tmp_path, monkeypatch):
    """On Linux and macOS a PermissionError of a rename is the folder's, and is raised at once."""
    from dkl_lib import distributed, experiments

    monkeypatch.setattr(distributed, "_RETRY_REPLACE", False)
    calls = _flaky_replace(monkeypatch, 1)
    with pytest.raises(PermissionError, match="Access is denied"):
        experiments._atomic_write(tmp_path / "results.json", b"{}")
    assert len(calls) == 1


def test_amp_on_mps_is_refused_not_silently_ignored(fake_mps):
    """bf16 autocast runs on CUDA and the CPU here; on MPS amp=True used to train in float32 while the
    run's config said amp=True. Off by default on MPS, an error when asked for."""
    d = _tiny()
    model = M.build_model("mlp", 4, seed=0, in_shape=(1, 6, 6), hidden=(8,))
    with pytest.raises(ValueError, match="amp"):
        T.train_teacher(model, d, epochs=1, batch_size=16, progress=False, amp=True)
    res = T.train_teacher(model, d, epochs=1, batch_size=16, progress=False)
    assert res.config["device"] == "mps" and res.config["amp"] is False


def test_printed_commands_use_windows_quoting_on_windows(monkeypatch):
    """`python -m dkl_lib.configs FILE` prints a command to paste: cmd.exe keeps 'single quotes' as part
    of the argument (and splits "[150, 180, 210]" at the spaces), so on Windows it is double-quoted."""
    from dkl_lib import configs

    cfg = configs.load_config(REPO / "configs" / "kd_cifar100_resnet32x4_resnet8x4.yaml")
    posix = configs.config_command(cfg, out="/tmp/runs/kd")
    assert "'distill.milestones=[150, 180, 210]'" in posix
    monkeypatch.setattr(configs, "_WINDOWS", True)
    windows = configs.config_command(cfg, out="C:\\Users\\me\\runs\\kd")
    assert '"distill.milestones=[150, 180, 210]"' in windows and "'" not in windows
    assert windows.endswith("--out C:\\Users\\me\\runs\\kd")
    assert windows.replace('"distill.milestones=[150, 180, 210]"', "X").split() == \
        [a if a != "distill.milestones=[150, 180, 210]" else "X"
         for a in ["python", "-m", "dkl_lib.experiments", *configs.config_to_cli(cfg, out="C:\\Users\\me\\runs\\kd")]]


def test_cli_a_results_file_held_open_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Windows: results.csv open in a spreadsheet when the grid ends. The command says which file and what
    to do in one line (exit 1), and the runs are in the cache: the same command then only writes."""
    from dkl_lib import distributed, experiments

    monkeypatch.setattr(distributed, "_RETRY_REPLACE", True)
    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "results.csv":
            raise PermissionError(13, "Access is denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    argv = ["kd", "--preset", "cpu-quick", "--losses", "kl", "--seeds", "0", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "runs"), "--device", "cpu", "--epochs", "1", "--quiet",
            "--override", "data.n_train=100", "--override", "teacher.model_kw.width=4",
            "--override", "teacher.train.epochs=1", "--override", "distill.batch_size=50"]
    assert experiments.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: ") and "results.csv" in err[-1] and "another program keeps it open" in err[-1]
    monkeypatch.setattr(os, "replace", real)
    assert experiments.main(argv) == 0 and (tmp_path / "out" / "results.csv").exists()
