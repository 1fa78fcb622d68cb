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
    assert "Host cost per loss call on cpu" in summary and "| dkd | " in summary  # bench_host's table
    assert "| digits | 64 | 2 |" in summary and "| cifar | 2 | 1 |" in summary  # adversarial steps, with AWP
    assert "Estimated training time per run on this device (DRY RUN" in summary
    # the CUDA tests ran (after the KD step measurements) and, without a GPU, skipped every one of them
    cuda_tests = json.loads((tmp_path / "gpu_check.json").read_text())["cuda_tests"]
    assert cuda_tests["passed"] == cuda_tests["failed"] == 0 and cuda_tests["skipped"] >= 20
    assert f"CUDA tests (tests/test_cuda.py): 0 passed, 0 failed, {cuda_tests['skipped']} skipped" in summary
    kd = json.loads((tmp_path / "torchrun" / "results.json").read_text())
    assert [r["loss"] for r in kd["runs"]] == ["kl", "ikl"] and kd["config"]["checkpoint_every"] == 1
    adv = json.loads((tmp_path / "torchrun_adv" / "results.json").read_text())
    assert [r["loss"] for r in adv["runs"]] == ["trades", "ikl"]
    assert adv["config"]["train"]["awp_gamma"] == 0.005 and adv["config"]["train"]["weight_average"] == 0.999
    checks = [c for r in adv["runs"] for c in r["report"]["checks"]]
    assert all(c["status"] == "pass" for c in checks)
    assert "torchrun adversarial entry point: 2 process(es)" in summary
    assert f"sanity checks: all {len(checks)} passed" in summary
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
    # the teacher's own step time, 40 teacher epochs (a formula, not a timing comparison: under load the
    # batch-2 steps of the dry run can come out in any order)
    teacher_step = bundle["train"][0]["seconds_per_step"]["cpu"]["teacher"] / 2 * 128
    assert est[("kd", "gpu-short", "teacher")]["seconds"] == pytest.approx(teacher_step * -(-50000 // 128) * 40)
    adv_row = next(r for r in bundle["adv_steps"] if r["setting"] == "cifar")
    e = est[("adv", "gpu-short", "trades run")]  # PreActResNet-18, 10 epochs, no AWP in gpu-short
    assert "preact_resnet18, 10 epochs, no AWP, batch 128" in e["what"]
    assert e["seconds"] == pytest.approx(adv_row["trades_ms"] / 1e3 * 64 * 391 * 10)
    assert "measured with 1 attack steps, the preset has 10" in e["how"]
    assert est[("adv", "paper", "ikl run")]["how"] == "not measured"  # no WRN-34-10 in the dry run
    assert not list((tmp_path / "cache").glob("*/checkpoints"))  # finished runs leave no checkpoints


def test_gpu_check_summary_says_when_awp_runs_and_how_the_sanity_checks_ended(tmp_path):
    """benchmarks/gpu_check_summary.py on hand-made step results: the paper preset's AWP runs in
    epochs 10-200 (191 epochs, 1-based as in training), gpu-short has none; the adversarial smoke
    test's checks are counted as passed, warnings (a flag, not a failure) and FAILED, each named."""
    (tmp_path / "steps.txt").write_text("ok|adversarial training step\n")
    row = {"batch": 128, "trades_ms": 100.0, "ikl_ms": 105.0, "ratio": 1.05, "trades_awp_ms": 150.0,
           "ikl_awp_ms": 160.0, "awp_overhead": 1.5}
    rows = [{**row, "setting": "cifar", "attack_steps": 10}, {**row, "setting": "cifar100-wrn", "attack_steps": 5}]
    (tmp_path / "adv_steps.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "torchrun_adv").mkdir()
    (tmp_path / "torchrun_adv" / "launch.txt").write_text("2 30\n")
    statuses = {"trades": ["pass", "pass", "warn"], "ikl": ["pass", "fail", "pass"]}
    runs = [{"loss": loss, "clean_acc": 10.0, "pgd20_acc": 1.0, "ensemble_acc": 0.5,
             "report": {"checks": [{"check": f"check{i}", "status": st} for i, st in enumerate(sts)]}}
            for loss, sts in statuses.items()]
    (tmp_path / "torchrun_adv" / "results.json").write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), str(tmp_path), "cpu", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sanity checks: 4 of 6 passed, 1 warning(s) (trades: check2), 1 FAILED (ikl: check1)" in proc.stdout
    est = {(e["preset"], e["what"].split(",")[0]): e
           for e in json.loads((tmp_path / "gpu_check.json").read_text())["estimates"] if e["task"] == "adv"}
    assert "wrn_34_10, 200 epochs, AWP in epochs 10-200, batch 128, 5-step attack" in est[("paper", "ikl run")]["what"]
    assert est[("paper", "ikl run")]["seconds"] == pytest.approx(391 * (9 * 0.105 + 191 * 0.160))
    assert "10 epochs, no AWP" in est[("gpu-short", "trades run")]["what"]
    assert est[("gpu-short", "trades run")]["seconds"] == pytest.approx(391 * 10 * 0.100)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_a_cpu_without_the_flag_and_bad_options():
    proc = run(timeout=120)
    assert proc.returncode == 1 and "--allow-cpu" in proc.stderr
    proc = run("--fast", timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


# ------------------------------------------------------------------ a GPU machine without network
def _wheel(folder: Path, dist: str, files: dict, version: str = "0.0.1", tag: str = "py3-none-any") -> Path:
    """A minimal pure-Python wheel (what `pip install --no-index --target` needs, nothing more)."""
    import base64
    import hashlib
    import zipfile

    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    path = folder / f"{stem}-{tag}.whl"
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
    scratch = tmp_path / "tmp"  # the temporary site folder goes here, and is removed at the end
    scratch.mkdir()
    proc = run("--allow-cpu", "--env-only", "--wheels", str(wheels), timeout=120, env={**env, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "installed 2 wheel(s)" in proc.stderr and "Python packages ok" in proc.stderr
    assert not list(scratch.glob("gpu_check_site.*"))
    assert "environment checked, nothing run" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [(["--wheels", str(empty)], "no .whl files"), (["--wheels"], "needs a folder")]:
        proc = run("--allow-cpu", "--env-only", *args, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_wheels_made_for_another_python(tmp_path):
    """device_wheels.sh makes wheels for CPython 3.12 unless told --python 3.X: carried to a machine with
    another Python, the check stops before pip (exit 3, as for missing packages), naming both Pythons
    and the command that makes the right wheels; wheels for this Python (or any Python 3) pass."""
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    other = f"3{sys.version_info.minor + 1}"
    wheels = tmp_path / "other"
    wheels.mkdir()
    _wheel(wheels, "any_python", {"any_python.py": ""}, tag="py2.py3-none-any")
    _wheel(wheels, "multiprocess", {"multiprocess/__init__.py": ""}, tag=f"py{other}-none-any")
    proc = run("--allow-cpu", "--env-only", "--wheels", str(wheels), timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"multiprocess-0.0.1-py{other}-none-any.whl" in proc.stderr and "any_python" not in proc.stderr
    assert f"Python {this}" in proc.stderr and f"bash benchmarks/device_wheels.sh --python {this}" in proc.stderr
    assert "not a supported wheel" not in proc.stderr  # stopped before pip
    this_python = tmp_path / "this"
    this_python.mkdir()
    _wheel(this_python, "any_python", {"any_python.py": ""}, tag="py2.py3-none-any")
    _wheel(this_python, "multiprocess", {"multiprocess/__init__.py": ""}, tag=f"py{this.replace('.', '')}-none-any")
    proc = run("--allow-cpu", "--env-only", "--wheels", str(this_python), timeout=120)
    assert proc.returncode == 0 and "installed 2 wheel(s)" in proc.stderr, proc.stderr[-2000:]


def test_device_wheels_names_the_folder_to_carry(tmp_path):
    """The closing hint is the gpu_check command line for the folder the wheels went to: relative to
    the repository root when inside it, else absolute. pip downloads from hand-made wheels in a local
    folder here (PIP_NO_INDEX, PIP_FIND_LINKS): no network."""
    from importlib.metadata import version

    index = tmp_path / "index"
    index.mkdir()
    for dist in ("adversarial-robustness-toolbox", "multiprocess", "dill", "six"):
        _wheel(index, dist, {f"{dist.replace('-', '_')}.py": ""}, version=version(dist))
    repo = tmp_path / "repo"  # a copy of the two scripts, so that the default --dest is not this repository's
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("device_wheels.sh", "_common.sh"):
        (repo / "benchmarks" / name).write_text((REPO / "benchmarks" / name).read_text())
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
    for args, cwd, shown in [(["--python", "3.11", "--dest", str(tmp_path / "x" / "whl311")], REPO, tmp_path / "x" / "whl311"),
                             (["--dest", "rel/whl"], tmp_path, tmp_path / "rel" / "whl"),
                             (["--dest", str(repo / "sub" / "whl")], tmp_path, "sub/whl"),
                             ([], tmp_path, ".whl")]:
        proc = subprocess.run(["bash", str(repo / "benchmarks" / "device_wheels.sh"), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"on the GPU machine: bash benchmarks/gpu_check.sh --wheels {shown}\n" in proc.stderr, proc.stderr
        folder = repo / ".whl" if shown == ".whl" else repo / shown if shown == "sub/whl" else shown
        assert len(list(folder.glob("*.whl"))) == 4


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
    and the exit status is 4 (a step failed); --budget 0 skips them all and still summarises."""
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "sitecustomize.py").write_text(
        "import sys\n"
        "line = ' '.join(sys.orig_argv)\n"
        "if any(name in line for name in ('-m pytest', 'bench_losses.py', 'bench_train.py', 'bench_host.py',\n"
        "                                  'bench_adv.py',\n"
        "                                  'torch.distributed.run')):\n"
        "    raise SystemExit(7)\n")
    out = tmp_path / "failed"
    proc = run("--allow-cpu", "--quick", "--out", str(out), timeout=300, env={"PYTHONPATH": str(fail)})
    assert proc.returncode == 4, proc.stderr[-2000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert len(steps) == 7 and all(s["status"].startswith("FAILED") for s in steps), steps
    assert proc.stderr.count("going on with the other steps") == 7
    assert "Steps: 0 of 7 ran; NOT RUN: training step, batch 2 [FAILED" in (out / "summary.md").read_text()

    out = tmp_path / "budget"
    stale = [out / "cuda_tests.xml", out / "losses.json", out / "train_b64.json", out / "adv_steps.json", out / "host.json",
             out / "torchrun" / "results.json",
             out / "cache" / "x"]  # an earlier run's results in the same folder: not this run's
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    proc = run("--allow-cpu", "--quick", "--budget", "0", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(path.exists() for path in stale)
    bundle = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in bundle["steps"]] == ["skipped"] * 7 and bundle["losses"] == []
    assert bundle["host"] is None
    assert bundle["cuda_tests"] is None
    assert all(e["how"] == "not measured" for e in bundle["estimates"])
    assert run("--allow-cpu", "--budget", "soon", timeout=60).returncode == 2


def test_gpu_check_summary_names_failed_cuda_tests(tmp_path):
    """The first step's JUnit XML (tests/test_cuda.py on the GPU) is counted in the summary and each
    failed or erroring test is named."""
    (tmp_path / "steps.txt").write_text("FAILED (exit 1)|CUDA tests (pytest -m cuda tests/test_cuda.py)\n")
    (tmp_path / "cuda_tests.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x">boom</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><error message="y">setup</error></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"><skipped message="z"/></testcase>'
        '</testsuite></testsuites>')
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), str(tmp_path), "cpu", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA tests (tests/test_cuda.py): 1 passed, 2 failed, 1 skipped (FAILED: test_b, test_c)" in proc.stdout
    bundle = json.loads((tmp_path / "gpu_check.json").read_text())
    assert bundle["cuda_tests"] == {"passed": 1, "failed": 2, "skipped": 1, "failures": ["test_b", "test_c"]}


def _train_result(batch, ratios):
    """A bench_train.py JSON result on CUDA with these paired ratios to the KL step."""
    sec = {loss: 0.01 * r for loss, r in {"ce": 0.5, "kl": 1.0, **ratios, "teacher": 1.4}.items()}
    return {"batch": batch, "seconds_per_step": {"cuda": sec},
            "settings": {"cuda": {"amp": "bf16", "channels_last": True, "cudnn_benchmark": True, "reps": 30}},
            "ratio_to_kl": {"cuda": {loss: s / sec["kl"] for loss, s in sec.items()}},
            "ratio_to_kl_iqr": {"cuda": {loss: [s / sec["kl"] - 0.01, s / sec["kl"] + 0.01] for loss, s in sec.items()}},
            "ops_per_step": {"cuda": {loss: 460 for loss in sec}}}


def test_gpu_check_summary_gives_a_verdict_per_batch_and_survives_broken_results(tmp_path):
    """A batch whose step failed used to vanish from the targets (only measured batches had lines, so the
    ones shown could all read "ok"); now every batch gpu_check ran a step for has a per-loss and a
    whole-batch line, "n/a" when not measured. An unreadable result file (a step killed while writing)
    or adversarial rows without AWP keys used to end the summary with a traceback and no gpu_check.json."""
    steps = ["ok|training step, batch 64 (bench_train.py ...)", "ok|training step, batch 128 (bench_train.py ...)",
             "FAILED (exit 124)|training step, batch 256 (bench_train.py ...)", "ok|adversarial training step (...)"]
    (tmp_path / "steps.txt").write_text("\n".join(steps) + "\n")
    ok = {"dkl": 1.02, "ikl": 1.05, "gkl": 1.08, "dkd": 1.09}
    (tmp_path / "train_b64.json").write_text(json.dumps(_train_result(64, ok)))
    (tmp_path / "train_b128.json").write_text(json.dumps(_train_result(128, {**ok, "dkd": 1.12})))
    (tmp_path / "adv_steps.json").write_text('{"rows": [{"setting": "cifar", "batch": 128, "attack_ste')  # cut short
    (tmp_path / "host.json").write_text("[1, 2")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), str(tmp_path), "cpu", "9"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = json.loads((tmp_path / "gpu_check.json").read_text())
    met = {t["target"]: t["met"] for t in bundle["targets"]}
    assert met["every KD loss (dkl, ikl, gkl, dkd) within 1.10x of KL at batch 64"] is True
    assert met["every KD loss (dkl, ikl, gkl, dkd) within 1.10x of KL at batch 128"] is False
    assert met["dkd step within 1.10x of the KL step at batch 128"] is False
    assert met["every KD loss (dkl, ikl, gkl, dkd) within 1.10x of KL at batch 256"] is None
    assert all(met[f"{loss} step within 1.10x of the KL step at batch 256"] is None for loss in ok)
    assert "- n/a  every KD loss (dkl, ikl, gkl, dkd) within 1.10x of KL at batch 256: not measured (step FAILED (exit 124))" \
        in proc.stdout
    assert "- MISS every KD loss (dkl, ikl, gkl, dkd) within 1.10x of KL at batch 128: largest 1.12x" in proc.stdout
    assert any(p.startswith("adv_steps.json: unreadable") for p in bundle["problems"])
    assert any(p.startswith("host.json: unreadable") for p in bundle["problems"])
    assert "Not summarised: " in proc.stdout and [r["batch"] for r in bundle["train"]] == [64, 128]

    # adversarial rows measured without --awp: the table and the estimates say n/a instead of a KeyError
    (tmp_path / "adv_steps.json").write_text(json.dumps({"rows": [
        {"setting": "cifar", "batch": 128, "attack_steps": 10, "trades_ms": 77.7, "ikl_ms": 80.4, "ratio": 1.035}]}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_summary.py"), str(tmp_path), "cpu", "9"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| cifar | 128 | 10 | 77.7 ms | 80.4 ms | 1.035x | n/a ms | n/a ms | n/ax |" in proc.stdout
    bundle = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not any(p.startswith("adversarial") or p.startswith("estimated") for p in bundle["problems"])


def test_gpu_check_reads_a_budget_with_a_leading_zero_and_refuses_a_file_as_out(tmp_path):
    """--budget 08 passed the option check and then broke bash's arithmetic ("value too great for base"),
    which disabled the budget; --out naming a file was reported as a failure of "Python packages", exit 1
    (the status of "no CUDA device")."""
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "sitecustomize.py").write_text(  # every measuring step ends at once
        "import sys\n"
        "line = ' '.join(sys.orig_argv)\n"
        "if any(name in line for name in ('-m pytest', 'bench_', 'torch.distributed.run')):\n"
        "    raise SystemExit(7)\n")
    proc = run("--allow-cpu", "--quick", "--budget", "08", "--out", str(tmp_path / "out"), timeout=300,
               env={"PYTHONPATH": str(fail)})
    assert "value too great for base" not in proc.stderr and "invalid arithmetic" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode in (0, 4), proc.stderr[-2000:]  # skipped after 8 s, or failed: either way budgeted
    (tmp_path / "file").write_text("x")
    proc = run("--allow-cpu", "--out", str(tmp_path / "file"), timeout=120)
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr, proc.stderr[-2000:]
