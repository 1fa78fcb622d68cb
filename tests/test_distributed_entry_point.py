"""The experiments command line under ``torchrun --nproc_per_node=2`` (gloo, CPU) against the same
command in one process: same global batches, so the same teacher, students, class priors and final
metrics (float64 models without BatchNorm: equal up to float rounding). Also: resuming, under
torchrun, a run that a one-process session had checkpointed and then stopped. ``pytest -k
distributed`` selects these tests.

Each command runs once per session (module fixtures, about 5 s per torchrun launch).
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkl_lib import experiments as E

DATA = {"name": "synthetic", "n_train": 101, "n_test": 40, "num_classes": 4, "noise": 0.6, "seed": 0}
# 101 samples in global batches of 16: the last one (5) splits 3 + 2, so the loss scaling of an
# uneven share is exercised; MLPs (no BatchNorm) in float64, so one process and two agree exactly.
KD_OVERRIDES = {"data": DATA, "teacher.model": "mlp", "teacher.model_kw": {"hidden": [32]},
                "teacher.dtype": "float64", "student.dtype": "float64", "student.model_kw": {"hidden": [8]},
                "teacher.train.batch_size": 16, "distill.batch_size": 16, "distill.epochs": 4,
                "teacher.train.epochs": 3, "checkpoint_every": 1}
KD_LOSSES, KD_SEEDS = "ce,kl,ikl,dkd", "0,1"
ADV_OVERRIDES = {"data": DATA, "model.name": "mlp", "model.model_kw": {"hidden": [16]}, "model.dtype": "float64",
                 "eval.ensemble": False, "eval.samples": 40, "train.batch_size": 16, "train.eval_samples": 40,
                 "train.epochs": 3, "checkpoint_every": 1,
                 # AWP (its gradient is all-reduced) and the weight average, as in the paper preset
                 "train.awp_gamma": 0.01, "train.awp_warmup": 2, "train.weight_average": 0.8,
                 "train.weight_average_from": 1}


def _cli_args(task, overrides, losses, seeds, cache, out):
    args = [task, "--preset", "cpu-quick", "--losses", losses, "--seeds", seeds, "--quiet",
            "--cache-dir", str(cache), "--out", str(out)]
    for key, value in overrides.items():
        args += ["--override", f"{key}={json.dumps(value)}"]
    return args


def _run(args, *, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "dkl_lib.experiments", *args]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd)} did not finish in 300 s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    return done


def _entries(cache: Path):
    """{folder name: (entry.json, {file: tensor object})} of a cache folder."""
    out = {}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir()):
        entry = json.loads((folder / "entry.json").read_text())
        files = {name: torch.load(folder / name, weights_only=True) for name in entry["files"]}
        out[folder.name] = (entry, files)
    return out


@pytest.fixture(scope="module")
def kd_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_entry")
    for name, nproc in (("one", 1), ("two", 2)):
        _run(_cli_args("kd", KD_OVERRIDES, KD_LOSSES, KD_SEEDS, root / f"cache_{name}", root / f"out_{name}"),
             nproc=nproc)
    return root


@pytest.fixture(scope="module")
def adv_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv_entry")
    for name, nproc in (("one", 1), ("two", 2)):
        _run(_cli_args("adv", ADV_OVERRIDES, "trades,ikl", "0", root / f"cache_{name}", root / f"out_{name}"),
             nproc=nproc)
    return root


def _assert_same_results(root: Path, keys):
    one = json.loads((root / "out_one" / "results.json").read_text())
    two = json.loads((root / "out_two" / "results.json").read_text())
    assert len(one["runs"]) == len(two["runs"]) > 0
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["loss"], a["seed"], a["config_hash"]) == (b["loss"], b["seed"], b["config_hash"])
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-9), (a["loss"], a["seed"], key)
    return one, two


def _assert_same_cache(root: Path):
    one, two = _entries(root / "cache_one"), _entries(root / "cache_two")
    assert sorted(one) == sorted(two) and one
    for name, (entry, files) in one.items():
        entry2, files2 = two[name]
        assert entry["config"] == entry2["config"]
        if "report" in entry["result"]:   # an evaluation entry (adversarial runs)
            rep, rep2 = entry["result"]["report"], entry2["result"]["report"]
            assert (rep["clean_acc"], rep["pgd_acc"], rep["robust_acc"]) == \
                (rep2["clean_acc"], rep2["pgd_acc"], rep2["robust_acc"])
            continue
        hist, hist2 = entry["result"]["history"], entry2["result"]["history"]
        assert len(hist) == len(hist2) > 0
        for row, row2 in zip(hist, hist2):
            for key, value in row.items():
                if key != "seconds" and isinstance(value, float):
                    assert value == pytest.approx(row2[key], rel=1e-9, abs=1e-12, nan_ok=True), (name, key)
        for fname, obj in files.items():
            tensors = obj.items() if isinstance(obj, dict) else [("", obj)]
            for key, value in tensors:
                other = files2[fname][key] if key else files2[fname]
                err = (value.double() - other.double()).abs().max().item()
                assert err < 1e-10, (name, fname, key, err)   # measured: <= 4e-15
    return one, two


def test_distributed_kd_entry_point_under_torchrun_equals_one_process(kd_runs):
    one, two = _assert_same_results(kd_runs, ("best_acc", "last_acc", "teacher_acc", "best_epoch"))
    assert one["teacher"]["acc"] == two["teacher"]["acc"]
    assert [r["loss"] for r in two["runs"]] == ["ce", "ce", "kl", "kl", "ikl", "ikl", "dkd", "dkd"]
    for s1, s2 in zip(one["summary"], two["summary"]):
        assert s1["best_acc_mean"] == pytest.approx(s2["best_acc_mean"], abs=1e-9)
    # the summary rows of the CSV too: rank 0 wrote exactly the one-process files
    assert (kd_runs / "out_two" / "results.csv").read_text().count("\n") == \
        (kd_runs / "out_one" / "results.csv").read_text().count("\n")


def test_distributed_kd_teacher_students_and_class_prior_equal_one_process(kd_runs):
    one, two = _assert_same_cache(kd_runs)
    priors = [name for name, (_, files) in two.items() if "priors.pt" in files]
    assert len(priors) == 2      # ikl with GI, seeds 0 and 1: the all-reduced prior of every epoch
    for name in priors:
        assert two[name][1]["priors.pt"].shape == (5, 4, 4)
        assert torch.equal(one[name][1]["priors.pt"], two[name][1]["priors.pt"])
    teacher = [name for name in two if name.startswith("teacher-")]
    assert len(teacher) == 1 and two[teacher[0]][0]["result"]["origin"] == "trained"   # trained under DDP


def test_distributed_rank0_alone_writes_and_finished_runs_leave_no_checkpoints(kd_runs):
    for folder in (kd_runs / "cache_two").iterdir():
        names = sorted(p.name for p in folder.iterdir())
        assert "checkpoints" not in names                       # removed once the entry was written
        assert not [n for n in names if n.endswith(".tmp")]     # no half-written file from any rank
    assert sorted(p.name for p in (kd_runs / "out_two").iterdir()) == ["log.jsonl", "results.csv", "results.json"]
    # the per-epoch log, written by rank 0 alone: each (loss, seed, epoch) once, the teacher's epochs first, the
    # same lines as one process
    key = lambda r: (r["loss"], r["seed"], r["epoch"], r["test_acc"])  # noqa: E731
    logs = {n: [key(json.loads(line)) for line in (kd_runs / f"out_{n}" / "log.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    teacher_epochs = int(KD_OVERRIDES["teacher.train.epochs"])
    assert len(logs["two"]) == len(set(logs["two"])) == teacher_epochs + 4 * 2 * int(KD_OVERRIDES["distill.epochs"])
    assert [r[0] for r in logs["two"][:teacher_epochs]] == ["teacher"] * teacher_epochs
    assert logs["two"] == logs["one"]


def test_distributed_adv_entry_point_under_torchrun_equals_one_process(adv_runs):
    one, two = _assert_same_results(adv_runs, ("clean_acc", "pgd20_acc", "pgd50_acc", "robust_acc"))
    assert all(r["checks_passed"] for r in two["runs"])
    _assert_same_cache(adv_runs)


def test_distributed_torchrun_resumes_a_checkpoint_of_a_one_process_run(kd_runs, tmp_path):
    """A one-process session stops ikl seed 0 after 2 of 4 epochs (its checkpoint stays in the
    cache); the same command under torchrun then resumes it and ends where the uninterrupted
    one-process run ended."""
    overrides = dict(KD_OVERRIDES)
    cache = tmp_path / "cache"
    grid = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=overrides, cache_dir=cache, progress=False,
                      callback=lambda loss, seed, history: len(history) < 2)
    assert grid.runs.iloc[0]["stopped"] == "callback" and grid.runs.iloc[0]["epochs"] == 2
    ckpts = sorted(p.name for p in cache.glob("student-*/checkpoints/checkpoint-*.pt"))
    assert ckpts == ["checkpoint-000001.pt", "checkpoint-000002.pt"]   # the newest two are kept
    _run(_cli_args("kd", KD_OVERRIDES, "ikl", "0", cache, tmp_path / "out"), nproc=2)
    resumed = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert resumed["resumed_from"] == 2 and resumed["epochs"] == 4
    reference = json.loads((kd_runs / "out_one" / "results.json").read_text())["runs"]
    ref = next(r for r in reference if r["loss"] == "ikl" and r["seed"] == 0)
    assert resumed["config_hash"] == ref["config_hash"]
    assert resumed["best_acc"] == ref["best_acc"] and resumed["last_acc"] == ref["last_acc"]
    folder = next(cache.glob("student-*"))
    model = torch.load(folder / "model.pt", weights_only=True)
    ref_model = torch.load(kd_runs / "cache_one" / folder.name / "model.pt", weights_only=True)
    for key, value in ref_model.items():
        assert (model[key] - value).abs().max().item() < 1e-10, key
    assert not (folder / "checkpoints").exists()


def _torchrun_a_long_student(tmp_path, *, quiet=True):
    """(process, cache folder): the kd command under torchrun with 2 processes, in a session of its own,
    with a student far too long to finish in a test (for the Ctrl-C tests)."""
    overrides = {**KD_OVERRIDES, "teacher.train.epochs": 1, "distill.epochs": 100000}
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "dkl_lib.experiments", *_cli_args("kd", overrides, "kl", "0", cache, tmp_path / "out")]
    if not quiet:
        cmd.remove("--quiet")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    return proc, cache


def _wait_for_a_student_epoch(proc, cache, timeout_s=120):
    """Until rank 0 has checkpointed a student epoch (the command still running)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not list(cache.glob("student-*/checkpoints/checkpoint-*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "the student did not start training"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's worker processes in /proc")
def test_distributed_ctrl_c_in_one_process_ends_the_command_instead_of_hanging(tmp_path):
    """Ctrl-C (SIGINT) reaches one rank only, in the middle of a student's epochs: that rank leaves the
    grid, and the command must end (torchrun stops the other rank once this one has exited) rather than
    wait forever with the other rank inside a collective of the run. Before the fix the interrupted
    rank went on to the command's final barrier, which paired with the other rank's all-reduce: both
    processes hung (gloo's 30-minute timeout at best)."""
    import signal

    proc, cache = _torchrun_a_long_student(tmp_path)
    workers = []
    try:
        _wait_for_a_student_epoch(proc, cache)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGINT)   # the second worker torchrun started: rank 1
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("one interrupted rank left the command hanging")
        assert proc.returncode != 0
        assert "exitcode  : 130" in output   # the interrupted rank's status, in torchrun's report
    finally:
        if proc.poll() is None:  # the test failed with the command still running: end it and its workers
            for pid in workers:  # only while still torchrun's children (not a reused process id)
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid):
                        os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def test_distributed_missing_teacher_file_is_reported_once_not_once_per_process(tmp_path, monkeypatch):
    """A config's released-teacher file that is not there: the warning that a teacher is trained instead
    comes once under torchrun (rank 0), not once per process (8 copies on an 8-GPU machine)."""
    monkeypatch.setenv("DKL_DATA_DIR", str(tmp_path / "data"))
    overrides = {**KD_OVERRIDES, "teacher.checkpoint": "teachers/not_here.pth", "teacher.train.epochs": 1,
                 "distill.epochs": 1}
    done = _run(_cli_args("kd", overrides, "kl", "0", tmp_path / "cache", tmp_path / "out"), nproc=2)
    assert done.stderr.count("teachers/not_here.pth not found under") == 1, done.stderr[-3000:]


def test_distributed_ctrl_c_at_torchrun_gives_one_interrupted_line_and_keeps_the_epochs(tmp_path):
    """Ctrl-C in the terminal: the signal reaches torchrun (its workers run in sessions of their own), which
    hands SIGINT on to every rank. Our processes end as one process does: rank 0 alone prints the one
    `interrupted:` line, no rank prints a traceback, and the finished epochs stay in the checkpoints. What
    follows is torchrun's own: its launcher (torch.distributed.elastic) re-raises the signal as a
    SignalException traceback and exits with status 1, outside this library (README, "torchrun")."""
    import signal

    proc, cache = _torchrun_a_long_student(tmp_path, quiet=False)  # as a user runs it: progress bars on rank 0
    try:
        _wait_for_a_student_epoch(proc, cache)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the foreground group, i.e. torchrun
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C left the command running")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "no run finished" in lines[0], output[-3000:]
    traceback = output[output.find("Traceback"):] if "Traceback" in output else ""
    assert output.count("Traceback") <= 1 and "dkl_lib" not in traceback and "KeyboardInterrupt" not in output
    assert not traceback or "torch/distributed/elastic" in traceback and "SignalException" in traceback
    assert list(cache.glob("student-*/checkpoints/checkpoint-*.pt"))  # the finished epochs are kept
