"""benchmarks/gpu_check.sh, the one script a GPU session runs: its CPU dry run must keep working
(every step: loss kernels, training step under bf16 + channels_last, the kd and adv command lines
under torchrun with 2 gloo processes), so that a short GPU lease is not spent on a broken script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run(*args, timeout=600, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    proc = run("--allow-cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU (dry run)" in summary and "Settings: autocast bf16, channels_last on" in summary
    assert "| 2 | ikl |" in summary and "| 2 | teacher |" in summary  # the training-step table has its rows
    assert "| digits | 64 | 2 |" in summary and "| cifar | 2 | 1 |" in summary  # adversarial steps, with AWP
    assert "Estimated training time per run on this device (DRY RUN" in summary
    kd = json.loads((tmp_path / "torchrun" / "results.json").read_text())
    assert [r["loss"] for r in kd["runs"]] == ["kl", "ikl"] and kd["config"]["checkpoint_every"] == 1
    adv = json.loads((tmp_path / "torchrun_adv" / "results.json").read_text())
    assert [r["loss"] for r in adv["runs"]] == ["trades", "ikl"]
    assert adv["config"]["train"]["awp_gamma"] == 0.005 and adv["config"]["train"]["weight_average"] == 0.999
    assert all(c["status"] != "fail" for r in adv["runs"] for c in r["report"]["checks"])
    assert "torchrun adversarial entry point: 2 process(es)" in summary
    bundle = json.loads((tmp_path / "gpu_check.json").read_text())  # every result in one file
    assert bundle["kd_torchrun"] == kd and bundle["adv_torchrun"] == adv and bundle["device"] == "CPU (dry run)"
    assert [r["batch"] for r in bundle["train"]] == [2] and bundle["losses"][0]["batch"] == 16
    est = {(e["task"], e["preset"], e["what"].split(",")[0]): e for e in bundle["estimates"]}
    # kd: the presets' batches (128, 64) were not measured in the dry run (batch 2): scaled per image
    for preset, epochs, batch in (("gpu-short", 30, 128), ("paper", 240, 64)):
        e = est[("kd", preset, "student run (ikl)")]
        assert e["how"] == "scaled from batch 2" and f"{epochs} epochs, batch {batch}" in e["what"]
        step = bundle["train"][0]["seconds_per_step"]["cpu"]["ikl"] / 2 * batch
        assert e["seconds"] == pytest.approx(step * -(-50000 // batch) * epochs)
    assert est[("kd", "gpu-short", "teacher")]["seconds"] > est[("kd", "gpu-short", "student run (ikl)")]["seconds"]
    adv_row = next(r for r in bundle["adv_steps"] if r["setting"] == "cifar")
    e = est[("adv", "gpu-short", "trades run")]  # PreActResNet-18, 10 epochs, no AWP in gpu-short
    assert e["seconds"] == pytest.approx(adv_row["trades_ms"] / 1e3 * 64 * 391 * 10)
    assert "measured with 1 attack steps, the preset has 10" in e["how"]
    assert est[("adv", "paper", "ikl run")]["how"] == "not measured"  # no WRN-34-10 in the dry run
    assert not list((tmp_path / "cache").glob("*/checkpoints"))  # finished runs leave no checkpoints


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_a_cpu_without_the_flag_and_bad_options():
    proc = run(timeout=120)
    assert proc.returncode == 1 and "--allow-cpu" in proc.stderr
    proc = run("--fast", timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


# ------------------------------------------------------------------ a GPU machine without network
def _wheel(folder: Path, dist: str, files: dict) -> Path:
    """A minimal pure-Python wheel (what `pip install --no-index --target` needs, nothing more)."""
    import base64
    import hashlib
    import zipfile

    info = f"{dist}-0.0.1.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    path = folder / f"{dist}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_names_missing_packages_and_installs_carried_wheels(tmp_path):
    """An image without ART: exit 3 at once, naming the package and the fix; with --wheels the carried
    wheels are installed into a temporary folder (not into the Python) and the check passes."""
    block = tmp_path / "block"  # shadows the installed ART and multiprocess, as in an image without them
    for mod in ("art", "multiprocess"):
        (block / mod).mkdir(parents=True)
        (block / mod / "__init__.py").write_text(f"raise ImportError('no {mod} in this image')\n")
    env = {"PYTHONPATH": str(block)}
    proc = run("--allow-cpu", "--env-only", timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "missing Python packages: adversarial-robustness-toolbox, multiprocess" in proc.stderr
    assert "device_wheels.sh" in proc.stderr and "--wheels" in proc.stderr
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "art", {"art/__init__.py": "", "art/attacks/__init__.py": "", "art/attacks/evasion.py": "",
                           "art/estimators/__init__.py": "", "art/estimators/classification.py": ""})
    _wheel(wheels, "multiprocess", {"multiprocess/__init__.py": ""})
    proc = run("--allow-cpu", "--env-only", "--wheels", str(wheels), timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "installed 2 wheel(s)" in proc.stderr and "Python packages ok" in proc.stderr
    assert "environment checked, nothing run" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [(["--wheels", str(empty)], "no .whl files"), (["--wheels"], "needs a folder")]:
        proc = run("--allow-cpu", "--env-only", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr


def test_device_wheels_pins_the_tested_versions():
    from importlib.metadata import version

    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_wheels.sh"), "--print"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert pins == {name: version(name) for name in ("adversarial-robustness-toolbox", "multiprocess", "dill", "six")}
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "device_wheels.sh"), "--python", "twelve"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--python needs a version" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_goes_on_after_a_failed_step_and_keeps_to_its_budget(tmp_path):
    """On a one-shot GPU lease a failing step must not cost the others: every measuring step fails
    here (a sitecustomize ends each one at start), all are still attempted, the summary names them
    and the exit status is the first failure's; --budget 0 skips them all and still summarises."""
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "sitecustomize.py").write_text(
        "import sys\n"
        "line = ' '.join(sys.orig_argv)\n"
        "if any(name in line for name in ('bench_losses.py', 'bench_train.py', 'bench_adv.py', 'torch.distributed.run')):\n"
        "    raise SystemExit(7)\n")
    out = tmp_path / "failed"
    proc = run("--allow-cpu", "--quick", "--out", str(out), timeout=300, env={"PYTHONPATH": str(fail)})
    assert proc.returncode != 0, proc.stderr[-2000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert len(steps) == 5 and all(s["status"].startswith("FAILED") for s in steps), steps
    assert proc.stderr.count("going on with the other steps") == 5
    assert "Steps: 0 of 5 ran; NOT RUN: loss kernels [FAILED" in (out / "summary.md").read_text()

    out = tmp_path / "budget"
    proc = run("--allow-cpu", "--quick", "--budget", "0", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in bundle["steps"]] == ["skipped"] * 5 and bundle["losses"] == []
    assert all(e["how"] == "not measured" for e in bundle["estimates"])
    assert run("--allow-cpu", "--budget", "soon", timeout=60).returncode == 2
