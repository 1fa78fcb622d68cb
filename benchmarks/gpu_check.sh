#!/usr/bin/env bash
# One-shot GPU check (issue 7): loss kernels and KD training throughput on one CUDA device, with
# random tensors only (no network, no data set). Prints the torch/CUDA versions, the GPU, one
# summary table and the bf16 / channels_last settings used; under 8 minutes on a modern GPU.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine
#   bash benchmarks/gpu_check.sh --quick         # fewer repetitions (about a minute)
#   bash benchmarks/gpu_check.sh --allow-cpu --quick   # dry run on a CPU, tiny sizes
#   bash benchmarks/gpu_check.sh --wheels .whl   # a machine without network whose Python lacks ART:
#                                                # wheels from benchmarks/device_wheels.sh, made elsewhere
#
# Options: --quick, --allow-cpu, --out DIR (keep the JSON results there; default a temporary
# folder), --wheels DIR (install DIR/*.whl into a temporary folder first, no network, no
# dependencies), --env-only (stop after checking the GPU and the Python packages; seconds),
# --budget S (start no further measuring step once S seconds have passed; the summary says which
# steps were skipped). A step that fails does not stop the others: the summary lists it.
# Python: $PYTHON, else .venv/bin/python at the repository root, else python3.
# What it runs: benchmarks/bench_losses.py (kl, dkl, ikl closed form and the pairwise wMSE oracle,
# forward+backward, B = 256, C in {100, 1000}) and benchmarks/bench_train.py (one distillation
# step of resnet32x4 -> resnet8x4 on CIFAR-shaped random data, losses ce, kl, ikl and the teacher's
# own step, batch 64, 128 and 256, bf16 autocast + channels_last as in training),
# benchmarks/bench_adv.py (TRADES vs IKL-AT steps, with and without AWP, for the adversarial
# gpu-short and paper models), an estimate of each GPU preset's training time from those step
# times, then the experiments command line under
# torchrun (one process per GPU, nccl) for one short KD grid and one adversarial grid (AWP, weight
# average, PGD and the ART ensemble on the GPU) on random data. The Python packages every step
# needs are checked first, so a missing one costs seconds, not a finished training. Exit status: 0
# when everything ran (the target lines are informational), 1 without a CUDA device (unless
# --allow-cpu), 2 for bad options, 3 for missing Python packages, else the status of the first
# step that failed. Results: DIR/summary.md (also printed) and DIR/gpu_check.json (every result in
# one file), beside the per-step JSON files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benchmarks/_common.sh
source "$ROOT/benchmarks/_common.sh"
QUICK=0
ALLOW_CPU=0
OUT=""
WHEELS=""
ENV_ONLY=0
BUDGET=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        --out) [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
        --wheels) [[ $# -ge 2 && -d "$2" ]] || { echo "gpu_check: --wheels needs a folder of .whl files" >&2; exit 2; }
                  WHEELS="$2"; shift ;;
        --env-only) ENV_ONLY=1 ;;
        --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs whole seconds" >&2; exit 2; }
                  BUDGET="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

pick_python "$ROOT"
command -v "$PY" >/dev/null || { echo "gpu_check: no python at $PY (set PYTHON=...)" >&2; exit 1; }

STEP="environment"
trap 'echo "gpu_check: FAILED during: $STEP (exit $?)" >&2' ERR
START=$SECONDS

# ---- 0. carried wheels (a machine without network: ART and multiprocess are not in every image) ----
SITE=""
if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob; WHL=("$WHEELS"/*.whl); shopt -u nullglob
    [[ ${#WHL[@]} -gt 0 ]] || { echo "gpu_check: no .whl files in $WHEELS" >&2; exit 2; }
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
    STEP="installing ${#WHL[@]} wheel(s) from $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHL[@]}" >&2
    echo "gpu_check: installed ${#WHL[@]} wheel(s) from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')" >&2
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# ---- 1. environment, and fail fast without CUDA ------------------------------------------------
DEVICE="$("$PY" - <<'EOF'
import sys
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}, "
      f"python {sys.version.split()[0]}", file=sys.stderr)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0 of {torch.cuda.device_count()}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
          f"compute capability {p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}",
          file=sys.stderr)
    print("cuda")
elif torch.version.cuda is None:
    print("this torch build has no CUDA support (a CPU-only wheel)", file=sys.stderr)
    print("cpu")
else:
    print("torch has CUDA support but sees no device (driver, CUDA_VISIBLE_DEVICES?)", file=sys.stderr)
    print("cpu")
EOF
)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        | sed 's/^/nvidia-smi: /' >&2 || true
fi
if [[ "$DEVICE" != "cuda" ]]; then
    if [[ $ALLOW_CPU -eq 0 ]]; then
        echo "gpu_check: no CUDA device; this script measures a GPU. Use --allow-cpu for a dry run on the CPU." >&2
        exit 1
    fi
    echo "gpu_check: DRY RUN on the CPU (--allow-cpu): tiny sizes, the numbers say nothing about a GPU" >&2
fi

# ---- 1b. every Python package the steps import, before any of them runs ---------------------------
STEP="Python packages"
if ! "$PY" - <<'EOF'
import importlib
import sys

needed = [("numpy", "numpy"), ("pandas", "pandas"), ("sklearn", "scikit-learn"), ("tqdm", "tqdm"),
          ("yaml", "pyyaml"), ("torchvision", "torchvision"), ("torch.distributed.run", "torch"),
          ("art.attacks.evasion", "adversarial-robustness-toolbox"),
          ("art.estimators.classification", "adversarial-robustness-toolbox"), ("multiprocess", "multiprocess")]
missing = {}
for module, package in needed:
    try:
        importlib.import_module(module)
    except ImportError as err:
        missing.setdefault(package, f"{module}: {err}")
if missing:
    print("gpu_check: missing Python packages: " + ", ".join(missing), file=sys.stderr)
    for package, why in missing.items():
        print(f"  {package} ({why})", file=sys.stderr)
    print("  with network: pip install " + " ".join(missing) + "; without (a GPU machine that cannot reach\n"
          "  PyPI): run `bash benchmarks/device_wheels.sh` where pip works, carry the .whl folder there and\n"
          "  pass --wheels .whl", file=sys.stderr)
    sys.exit(3)
import dkl_lib.experiments  # noqa: F401,E402  (the package itself imports)
print("gpu_check: Python packages ok (" + ", ".join(sorted({p for _, p in needed})) + ")", file=sys.stderr)
EOF
then
    exit 3
fi
if [[ $ENV_ONLY -eq 1 ]]; then echo "gpu_check: --env-only: environment checked, nothing run" >&2; exit 0; fi

if [[ -z "$OUT" ]]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; fi
mkdir -p "$OUT"
: > "$OUT/steps.txt"  # one line per measuring step: ok / FAILED (exit N) / skipped, and its text

# step TEXT COMMAND...: run one measuring step; a failure is recorded (the others still run) and a
# step that would start after --budget seconds is skipped
FIRST_RC=0
step() {
    local text="$1" rc=0
    shift
    STEP="$text"
    if [[ -n "$BUDGET" && $((SECONDS - START)) -ge $BUDGET ]]; then
        echo "== skipped (budget of $BUDGET s spent): $text" >&2
        echo "skipped|$text" >> "$OUT/steps.txt"
        return 0
    fi
    echo "== $text" >&2
    "$@" >&2 || rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "ok|$text" >> "$OUT/steps.txt"
    else
        echo "gpu_check: FAILED (exit $rc): $text; going on with the other steps" >&2
        echo "FAILED (exit $rc)|$text" >> "$OUT/steps.txt"
        [[ $FIRST_RC -ne 0 ]] || FIRST_RC=$rc
    fi
}

# ---- 2. sizes ------------------------------------------------------------------------------------
if [[ "$DEVICE" == "cuda" ]]; then
    LOSS_ARGS=(--device cuda --batches 256 --classes 100,1000)
    TRAIN_ARGS=(--devices cuda --losses ce,kl,ikl,teacher --warmup 3)
    TRAIN_BATCHES=(64 128 256)  # the paper preset's batch, gpu-short's, and a large one
    # the adversarial presets' steps: gpu-short PreActResNet-18 with 10 attack steps, paper WRN-34-10 with 5
    ADV_ARGS=(--devices cuda --settings cifar:10,cifar100-wrn:5 --awp 0.005 --warmup 2 --loss-reps 50)
    if [[ $QUICK -eq 1 ]]; then LOSS_ARGS+=(--budget 0.3 --reps 50); TRAIN_ARGS+=(--reps 10); ADV_ARGS+=(--reps 3)
    else LOSS_ARGS+=(--budget 1.0 --reps 200); TRAIN_ARGS+=(--reps 30); ADV_ARGS+=(--reps 8); fi
else
    LOSS_ARGS=(--device cpu --threads 2 --classes 10,100)
    TRAIN_ARGS=(--devices cpu --threads 2 --losses ce,kl,ikl,teacher --warmup 1 --amp bf16 --channels-last on)  # the GPU path
    ADV_ARGS=(--devices cpu --threads 2 --settings digits:2,cifar:1 --cifar-batch 2 --awp 0.005 --warmup 1
              --loss-reps 3 --reps 1)
    if [[ $QUICK -eq 1 ]]; then
        LOSS_ARGS+=(--batches 16 --budget 0.05 --reps 5); TRAIN_ARGS+=(--reps 1); TRAIN_BATCHES=(2)
    else
        LOSS_ARGS+=(--batches 64 --budget 0.2 --reps 20); TRAIN_ARGS+=(--reps 2); TRAIN_BATCHES=(8)
    fi
fi

# ---- 3. loss kernels -----------------------------------------------------------------------------
step "loss kernels (bench_losses.py ${LOSS_ARGS[*]})" \
    timeout 240 "$PY" "$ROOT/benchmarks/bench_losses.py" "${LOSS_ARGS[@]}" --json "$OUT/losses.json"

# ---- 4. training throughput ----------------------------------------------------------------------
for B in "${TRAIN_BATCHES[@]}"; do
    step "training step, batch $B (bench_train.py ${TRAIN_ARGS[*]} --batch $B)" \
        timeout 150 "$PY" "$ROOT/benchmarks/bench_train.py" "${TRAIN_ARGS[@]}" --batch "$B" --json "$OUT/train_b$B.json"
done

# ---- 4b. adversarial training step: TRADES vs IKL-AT, with and without AWP -------------------------
step "adversarial training step (bench_adv.py ${ADV_ARGS[*]})" \
    timeout 240 "$PY" "$ROOT/benchmarks/bench_adv.py" "${ADV_ARGS[@]}" --json "$OUT/adv_steps.json"

# ---- 5. the experiments entry point under torchrun --------------------------------------------------
# One KD grid (kl, ikl; 1 epoch) through `python -m dkl_lib.experiments` under torchrun with one
# process per GPU (nccl; 2 gloo processes in the CPU dry run), on CIFAR-shaped random data held on the
# device with crop + flip done there, bf16 + channels_last, per-epoch checkpoints: the code path of
# a full run, end to end, without a data set.
if [[ "$DEVICE" == "cuda" ]]; then
    NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
    SYN='{"name":"synthetic","n_train":4096,"n_test":1000,"num_classes":100,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    MODELS=()
else
    NPROC=2
    SYN='{"name":"synthetic","n_train":64,"n_test":32,"num_classes":10,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    MODELS=(--override teacher.model=resnet8x4)
fi
T0=$SECONDS
step "experiments entry point under torchrun ($NPROC processes)" \
    env OMP_NUM_THREADS=1 timeout 240 "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m dkl_lib.experiments kd --preset gpu-short --losses kl,ikl --seeds 0 --epochs 1 --checkpoint-every 1 \
    --override "data=$SYN" "${MODELS[@]}" --cache-dir "$OUT/cache" --out "$OUT/torchrun"
[[ ! -f "$OUT/torchrun/results.json" ]] || echo "$NPROC $((SECONDS - T0))" > "$OUT/torchrun/launch.txt"

# ---- 6. the adversarial entry point under torchrun ----------------------------------------------------
# TRADES and IKL-AT for 1 epoch with the paper recipe's AWP and weight average switched on from the
# start, then the whole evaluation (clean, PGD-20/50, the ART AutoAttack-style ensemble on the GPU,
# sanity checks): PreActResNet-18 on CIFAR-10-shaped random data (resnet8 in the CPU dry run).
if [[ "$DEVICE" == "cuda" ]]; then
    SYN10='{"name":"synthetic","n_train":2048,"n_test":512,"num_classes":10,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    ADV_MODEL=()
    ADV_EVAL=(--override eval.samples=256 --override eval.square_queries=200)
else
    SYN10='{"name":"synthetic","n_train":64,"n_test":32,"num_classes":10,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    ADV_MODEL=(--override model.name=resnet8)
    ADV_EVAL=(--override eval.samples=16 --override eval.square_queries=20 --override eval.apgd_iters=10
              --override train.attack_steps=2 --override train.eval_samples=16)
fi
T0=$SECONDS
step "adversarial entry point under torchrun ($NPROC processes)" \
    env OMP_NUM_THREADS=1 timeout 240 "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m dkl_lib.experiments adv --preset gpu-short --losses trades,ikl --seeds 0 --epochs 1 --checkpoint-every 1 \
    --override "data=$SYN10" "${ADV_MODEL[@]}" "${ADV_EVAL[@]}" --override train.awp_gamma=0.005 \
    --override train.awp_warmup=0 --override train.weight_average=0.999 --override train.weight_average_from=1 \
    --cache-dir "$OUT/cache" --out "$OUT/torchrun_adv"
[[ ! -f "$OUT/torchrun_adv/results.json" ]] || echo "$NPROC $((SECONDS - T0))" > "$OUT/torchrun_adv/launch.txt"

# ---- 7. summary ----------------------------------------------------------------------------------
STEP="summary"
"$PY" - "$OUT" "$DEVICE" "$((SECONDS - START))" <<'EOF' | tee "$OUT/summary.md"
import glob
import json
import math
import os
import sys

import torch

out, device, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
print(f"\n## gpu_check: {name}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}\n")


def _load(path):
    return json.load(open(path)) if os.path.exists(path) else None


step_log = [line.rstrip("\n").split("|", 1) for line in open(os.path.join(out, "steps.txt")) if "|" in line]
not_ok = [(status, text) for status, text in step_log if status != "ok"]
print(f"Steps: {len(step_log) - len(not_ok)} of {len(step_log)} ran" + ("" if not not_ok else "; NOT RUN: " + "; ".join(
    f"{text.split(' (')[0]} [{status}]" for status, text in not_ok)) + "\n")

losses = _load(os.path.join(out, "losses.json")) or []
mem = lambda n: "n/a" if n is None else (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
                                          if n >= 2**20 else f"{n / 2**10:.0f} KiB")
ratio = lambda x: f"{x:.2f}x" if x < 10 else f"{x:.0f}x"
print("Loss kernels: float32 forward+backward, T = 4, median per call")
print("| B | C | kl | dkl | ikl | pairwise | ikl / kl | pairwise / ikl | peak mem ikl | peak mem pairwise |")
print("|---|---|---|---|---|---|---|---|---|---|")
targets = []
for r in losses:
    t, p = r["seconds"], r["peak_bytes"]
    times = " | ".join(f"{t[m] * 1e3:.3f} ms" for m in ("kl", "dkl", "ikl", "pairwise"))
    ikl_kl, pair_ikl = t["ikl"] / t["kl"], t["pairwise"] / t["ikl"]
    print(f"| {r['batch']} | {r['classes']} | {times} | {ratio(ikl_kl)} | {ratio(pair_ikl)} "
          f"| {mem(p.get('ikl'))} | {mem(p.get('pairwise'))} |")
    if r["batch"] == 256 and r["classes"] == 1000:
        targets.append(("ikl / kl <= 1.5x at B = 256, C = 1000", ikl_kl <= 1.5, f"{ikl_kl:.2f}x"))
        targets.append(("pairwise >= 1000x ikl at B = 256, C = 1000", pair_ikl >= 1000, f"{pair_ikl:.0f}x"))

print("\nTraining step: resnet32x4 -> resnet8x4 distillation, CIFAR-100 shapes, random data, median per step")
print("| batch | loss | ms / step | images / s | time / KL step |")
print("|---|---|---|---|---|")
settings = None
train_runs = sorted((json.load(open(p)) for p in glob.glob(os.path.join(out, "train_b*.json"))),
                    key=lambda run: run["batch"])
kd_times = {}  # batch -> {loss: seconds per step}, for the estimates below
for run in train_runs:
    (dev, med), = run["seconds_per_step"].items()
    kd_times[run["batch"]] = med
    settings = run["settings"][dev]
    for loss, sec in med.items():
        print(f"| {run['batch']} | {loss} | {sec * 1e3:.2f} | {run['batch'] / sec:,.0f} | {sec / med['kl']:.2f}x |")
    for loss in ("ikl",):
        if loss in med and "kl" in med:
            targets.append((f"{loss} step within 1.10x of the KL step at batch {run['batch']}",
                            med[loss] / med["kl"] <= 1.10, f"{med[loss] / med['kl']:.2f}x"))
if settings:
    print(f"\nSettings: autocast {settings['amp']}, channels_last {'on' if settings['channels_last'] else 'off'}, "
          f"cudnn.benchmark {'on' if settings['cudnn_benchmark'] else 'off'}, {settings['reps']} timed rounds "
          f"(loss kernels: float32, no autocast)")
adv_rows = (_load(os.path.join(out, "adv_steps.json")) or {"rows": []})["rows"]
print("\nAdversarial training step: TRADES vs IKL-AT (outer loss + inner attack), median per step")
print("| setting | batch | attack steps | TRADES | IKL-AT | IKL-AT / TRADES | +AWP: TRADES | IKL-AT | AWP cost |")
print("|---|---|---|---|---|---|---|---|---|")
for r in adv_rows:
    print(f"| {r['setting']} | {r['batch']} | {r['attack_steps']} | {r['trades_ms']:.1f} ms | {r['ikl_ms']:.1f} ms "
          f"| {r['ratio']:.3f}x | {r['trades_awp_ms']:.1f} ms | {r['ikl_awp_ms']:.1f} ms | {r['awp_overhead']:.2f}x |")
    if r["setting"] != "digits":
        targets.append((f"IKL-AT step within 1.10x of TRADES ({r['setting']})", r["ratio"] <= 1.10, f"{r['ratio']:.3f}x"))

# ---- what a full run of each GPU preset would take, from the step times above
from dkl_lib import experiments as E  # noqa: E402

N_TRAIN = 50000  # CIFAR-10/100 training images


def step_time(times, key, batch):
    """(seconds per step, how): measured at this batch, else scaled per image from the nearest
    measured batch (a rough guess: small batches use a GPU less well)."""
    if key in times.get(batch, {}):
        return times[batch][key], "measured"
    have = [b for b in times if key in times[b]]
    if not have:
        return None, "not measured"
    near = min(have, key=lambda b: abs(math.log(b / batch)))
    return times[near][key] / near * batch, f"scaled from batch {near}"


def hours(sec):
    return "n/a" if sec is None else (f"{sec / 3600:.1f} h" if sec >= 5400 else f"{sec / 60:.1f} min")


estimates = []
for preset in ("gpu-short", "paper"):
    cfg = E.resolve_config(preset)
    d, t = cfg["distill"], cfg["teacher"]["train"]
    for what, key, sec_epochs, bs in (("student run (ikl)", "ikl", d["epochs"], d["batch_size"]),
                                      ("student run (kl)", "kl", d["epochs"], d["batch_size"]),
                                      ("teacher, when trained (no released file)", "teacher", t["epochs"], t["batch_size"])):
        sec, how = step_time(kd_times, key, bs)
        total = None if sec is None else sec * math.ceil(N_TRAIN / bs) * sec_epochs
        estimates.append({"task": "kd", "preset": preset, "what": f"{what}, {sec_epochs} epochs, batch {bs}",
                          "seconds": total, "how": how})
adv_by_setting = {r["setting"]: r for r in adv_rows}
for preset in ("gpu-short", "paper"):
    cfg = E.resolve_adv_config(preset)
    tr, model = cfg["train"], cfg["model"]["name"]
    setting = {"preact_resnet18": "cifar", "wrn_34_10": "cifar100-wrn"}.get(model)
    r = adv_by_setting.get(setting)
    for loss, key in (("trades", "trades"), ("ikl", "ikl")):
        if r is None:
            estimates.append({"task": "adv", "preset": preset, "what": f"{loss} run, {model}", "seconds": None,
                              "how": "not measured"})
            continue
        scale = tr["batch_size"] / r["batch"]  # per image, when the batches differ
        plain = r[f"{key}_ms"] / 1e3 * scale
        awp = r[f"{key}_awp_ms"] / 1e3 * scale
        steps = math.ceil(N_TRAIN / tr["batch_size"])
        awp_epochs = max(0, tr["epochs"] - tr.get("awp_warmup", 0)) if tr.get("awp_gamma", 0) > 0 else 0
        total = steps * ((tr["epochs"] - awp_epochs) * plain + awp_epochs * awp)
        how = "measured" if scale == 1 else f"scaled from batch {r['batch']}"
        if r["attack_steps"] != tr["attack_steps"]:
            how += f"; measured with {r['attack_steps']} attack steps, the preset has {tr['attack_steps']}"
        estimates.append({"task": "adv", "preset": preset,
                          "what": f"{loss} run, {model}, {tr['epochs']} epochs ({awp_epochs} with AWP), batch "
                                  f"{tr['batch_size']}, {tr['attack_steps']}-step attack",
                          "seconds": total, "how": how})
print("\nEstimated training time per run on this device" + (" (DRY RUN: says nothing about a GPU)" if device != "cuda" else "")
      + ": median step time x steps per epoch (50 000 images) x epochs; without the per-epoch test pass and the\n"
        "final robustness evaluation")
print("| task | preset | run | estimate | step time |")
print("|---|---|---|---|---|")
for e in estimates:
    print(f"| {e['task']} | {e['preset']} | {e['what']} | {hours(e['seconds'])} | {e['how']} |")

launch = os.path.join(out, "torchrun", "launch.txt")
if os.path.exists(launch):
    nproc, secs = open(launch).read().split()
    res = json.load(open(os.path.join(out, "torchrun", "results.json")))
    runs = ", ".join(f"{r['loss']} {r['last_acc']:.1f} %" for r in res["runs"])
    print(f"\ntorchrun entry point: {nproc} process(es), kd kl + ikl, 1 epoch on random CIFAR-shaped data, "
          f"{secs} s with start-up; last-epoch test accuracy (synthetic data, 1 epoch: a smoke test, not a result): {runs}")
launch = os.path.join(out, "torchrun_adv", "launch.txt")
if os.path.exists(launch):
    nproc, secs = open(launch).read().split()
    res = json.load(open(os.path.join(out, "torchrun_adv", "results.json")))
    runs = "; ".join(f"{r['loss']} clean {r['clean_acc']:.1f} / PGD-20 {r['pgd20_acc']:.1f} / ensemble "
                     f"{r['ensemble_acc']:.1f} %" for r in res["runs"])
    checks = [c for r in res["runs"] for c in r["report"]["checks"]]
    failed = [c["check"] for c in checks if c["status"] == "fail"]
    print(f"\ntorchrun adversarial entry point: {nproc} process(es), trades + ikl with AWP and weight average, "
          f"1 epoch on random data, {secs} s with start-up (a smoke test, not a result): {runs}; sanity checks: "
          f"{len(checks) - len(failed)} of {len(checks)} not failed" + (f" (FAILED: {failed})" if failed else ""))
if device == "cuda" and targets:
    print("\nTargets (informational):")
    for text, ok, value in targets:
        print(f"- {'ok  ' if ok else 'MISS'} {text}: {value}")
print(f"\nTotal wall time {seconds} s; JSON results in {out} (all of them in gpu_check.json)")

bundle = {"steps": [{"status": status, "step": text} for status, text in step_log], "device": name,
          "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": seconds,
          "losses": losses, "train": train_runs,
          "kd_torchrun": _load(os.path.join(out, "torchrun", "results.json")),
          "adv_torchrun": _load(os.path.join(out, "torchrun_adv", "results.json")),
          "adv_steps": adv_rows, "estimates": estimates,
          "targets": [{"target": t, "met": bool(ok), "value": v} for t, ok, v in targets]}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(bundle, f, indent=1)
EOF
exit "$FIRST_RC"
