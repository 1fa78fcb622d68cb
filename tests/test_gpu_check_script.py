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


def run(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    proc = run("--allow-cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU (dry run)" in summary and "Settings: autocast bf16, channels_last on" in summary
    assert "| 2 | ikl |" in summary  # the training-step table has its rows
    kd = json.loads((tmp_path / "torchrun" / "results.json").read_text())
    assert [r["loss"] for r in kd["runs"]] == ["kl", "ikl"] and kd["config"]["checkpoint_every"] == 1
    adv = json.loads((tmp_path / "torchrun_adv" / "results.json").read_text())
    assert [r["loss"] for r in adv["runs"]] == ["trades", "ikl"]
    assert adv["config"]["train"]["awp_gamma"] == 0.005 and adv["config"]["train"]["weight_average"] == 0.999
    assert all(c["status"] != "fail" for r in adv["runs"] for c in r["report"]["checks"])
    assert "torchrun adversarial entry point: 2 process(es)" in summary
    assert not list((tmp_path / "cache").glob("*/checkpoints"))  # finished runs leave no checkpoints


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_a_cpu_without_the_flag_and_bad_options():
    proc = run(timeout=120)
    assert proc.returncode == 1 and "--allow-cpu" in proc.stderr
    proc = run("--fast", timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
