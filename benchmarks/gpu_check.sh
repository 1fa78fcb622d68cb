#!/usr/bin/env bash
# The one script to run on a CUDA machine lent for a short time: measures this project's loss
# kernels and its KD and adversarial training steps, estimates each GPU preset's training time, and
# runs the experiments command line under torchrun end to end, all on random tensors (no network,
# no data set). Prints the torch/CUDA versions, the GPU, the summary tables and the bf16 /
# channels_last settings used; under 8 minutes on a modern GPU.
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
# What it runs, in this order: benchmarks/bench_train.py (one distillation
# step of resnet32x4 -> resnet8x4 on CIFAR-shaped random data, losses ce, kl, dkl, ikl, gkl, dkd and the teacher's
# own step, batch 64, 128 and 256, bf16 autocast + channels_last as in training; every KD loss
# as a paired ratio to the KL step of the same round), benchmarks/bench_host.py (what each loss call
# costs the host, launches included, on tiny logits), tests/test_cuda.py (pytest -m cuda: the CUDA
# code paths checked against the CPU), benchmarks/bench_losses.py (kl, dkl, ikl closed form and the
# pairwise wMSE oracle, forward+backward, B = 256, C in {100, 1000}), benchmarks/bench_adv.py (TRADES vs IKL-AT steps, with and without AWP, for the adversarial
# gpu-short and paper models), an estimate of each GPU preset's training time from those step
# times, then the experiments command line under
# torchrun (one process per GPU, nccl) for one short KD grid and one adversarial grid (AWP, weight
# average, PGD and the ART ensemble on the GPU) on random data, and last (GPU only, not --quick; where
# --budget leaves time) torch.compile'd KD steps against eager ones. The Python packages every step
# needs are checked first, so a missing one costs seconds, not a finished training. Exit status: 0
# when everything ran (the target lines are informational), 1 without a CUDA device (unless
# --allow-cpu), 2 for bad options, 3 for missing Python packages or --wheels made for another
# Python, 4 when a measuring step failed (summary.md and steps.txt name it and its own exit status),
# 5 when the summary itself failed (the steps' JSON files are still in the --out folder). Results (benchmarks/gpu_check_summary.py):
# DIR/summary.md (also printed) and DIR/gpu_check.json (every result in one file), beside the
# per-step JSON files.
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
                  BUDGET=$((10#$2)); shift ;;  # base 10: "08" is 8 seconds, not an octal error
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
    # wheels made for another Python (device_wheels.sh makes CPython 3.12's unless told --python 3.X):
    # said plainly, with the fix, before pip refuses them as "not a supported wheel on this platform"
    "$PY" - "$WHEELS" "${WHL[@]}" <<'EOF' || exit 3
import os
import re
import sys

here = sys.version_info[:2]


def fits(python_tag, abi_tag):
    """Whether a wheel's python tag (py3, py312, cp312, ...) admits this Python."""
    m = re.fullmatch(r"(cp|py)(\d)(\d+)", python_tag)
    if not m:
        return True  # py3, py2.py3 or a tag this check does not read: left to pip
    major, minor = int(m[2]), int(m[3])
    return (major, minor) == here or (abi_tag == "abi3" and m[1] == "cp" and major == here[0] and minor <= here[1])


wrong = []
for path in sys.argv[2:]:
    parts = os.path.basename(path)[:-len(".whl")].split("-")  # name-version[-build]-python-abi-platform
    if len(parts) < 5:
        continue  # not a wheel's name: left to pip
    python_tags, abi_tag = parts[-3], parts[-2]
    if not any(fits(tag, abi_tag) for tag in python_tags.split(".")):
        wrong.append(os.path.basename(path))
if wrong:
    this = f"{here[0]}.{here[1]}"
    print(f"gpu_check: wheels in {sys.argv[1]} made for another Python than this one (Python {this}, "
          f"{sys.executable}):\n  " + "\n  ".join(wrong) + f"\n  make the wheels for Python {this} where pip works: "
          f"bash benchmarks/device_wheels.sh --python {this} --dest DIR (a folder without these), then pass "
          "--wheels DIR here", file=sys.stderr)
    sys.exit(3)
EOF
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
    trap 'rm -rf "$SITE"' EXIT  # the installed wheels live as long as this run
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
          ("art.estimators.classification", "adversarial-robustness-toolbox"), ("multiprocess", "multiprocess"),
          ("pytest", "pytest")]
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

STEP="output folder"
if [[ -z "$OUT" ]]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; fi
if [[ -e "$OUT" && ! -d "$OUT" ]]; then echo "gpu_check: --out $OUT exists and is not a folder" >&2; exit 2; fi
mkdir -p "$OUT" || { echo "gpu_check: cannot make the --out folder $OUT" >&2; exit 2; }
# results of an earlier run in the same folder must not be summarised as this run's (a step that is
# skipped or fails writes nothing), and its run cache would turn the torchrun steps into cache reads
rm -rf "$OUT"/cuda_tests.xml "$OUT"/losses.json "$OUT"/train_b*.json "$OUT"/train_compiled.json "$OUT"/adv_steps.json \
    "$OUT"/host.json \
    "$OUT"/torchrun "$OUT"/torchrun_adv \
    "$OUT"/cache "$OUT"/summary.md "$OUT"/gpu_check.json
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
        FIRST_RC=4
    fi
}

# ---- 2. sizes ------------------------------------------------------------------------------------
if [[ "$DEVICE" == "cuda" ]]; then
    LOSS_ARGS=(--device cuda --batches 256 --classes 100,1000)
    TRAIN_ARGS=(--devices cuda --losses ce,kl,dkl,ikl,gkl,dkd,teacher --warmup 3)
    TRAIN_BATCHES=(64 128 256)  # the paper preset's batch, gpu-short's, and a large one
    HOST_ARGS=(--device cuda --rounds 1000)
    # the adversarial presets' steps: gpu-short PreActResNet-18 with 10 attack steps, paper WRN-34-10 with 5
    ADV_ARGS=(--devices cuda --settings cifar:10,cifar100-wrn:5 --awp 0.005 --warmup 2 --loss-reps 50)
    if [[ $QUICK -eq 1 ]]; then LOSS_ARGS+=(--budget 0.3 --reps 50); TRAIN_ARGS+=(--reps 10); ADV_ARGS+=(--reps 3)
    else LOSS_ARGS+=(--budget 1.0 --reps 200); TRAIN_ARGS+=(--reps 30); ADV_ARGS+=(--reps 8); fi
else
    LOSS_ARGS=(--device cpu --threads 2 --classes 10,100)
    TRAIN_ARGS=(--devices cpu --threads 2 --losses ce,kl,ikl,teacher --warmup 1 --amp bf16 --channels-last on)  # the GPU path
    HOST_ARGS=(--device cpu --rounds 50 --warmup 5)
    ADV_ARGS=(--devices cpu --threads 2 --settings digits:2,cifar:1 --cifar-batch 2 --awp 0.005 --warmup 1
              --loss-reps 3 --reps 1)
    if [[ $QUICK -eq 1 ]]; then
        LOSS_ARGS+=(--batches 16 --budget 0.05 --reps 5); TRAIN_ARGS+=(--reps 1); TRAIN_BATCHES=(2)
    else
        LOSS_ARGS+=(--batches 64 --budget 0.2 --reps 20); TRAIN_ARGS+=(--reps 2); TRAIN_BATCHES=(8)
    fi
fi

# ---- 3. training throughput (first: the measurement a short lease is for) -------------------
for B in "${TRAIN_BATCHES[@]}"; do
    step "training step, batch $B (bench_train.py ${TRAIN_ARGS[*]} --batch $B)" \
        timeout 150 "$PY" "$ROOT/benchmarks/bench_train.py" "${TRAIN_ARGS[@]}" --batch "$B" --json "$OUT/train_b$B.json"
done

# ---- 3a. what each loss call costs the host (the launches of a launch-bound step) ------------------
step "host cost per loss call (bench_host.py ${HOST_ARGS[*]})" \
    timeout 120 "$PY" "$ROOT/benchmarks/bench_host.py" "${HOST_ARGS[@]}" --json "$OUT/host.json"

# ---- 3b. correctness on the device: tests/test_cuda.py (the CUDA paths against the CPU as oracle) ----
# On a GPU: the losses' values and gradients, the class prior, the GPU augmentation, the trainers'
# CUDA defaults, KL = DKL in training, PGD and the ART ensemble, torch.compile, all on CUDA tensors.
# In the CPU dry run every one of them is skipped (they need a CUDA device). After the KD step
# measurements, and at most 180 s, so that a slow or hanging test (a Triton compilation, the ART
# ensemble) cannot use up the --budget of a short GPU lease before the measurements ran.
step "CUDA tests (pytest -m cuda tests/test_cuda.py)" \
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda "$ROOT/tests/test_cuda.py" \
    --junitxml "$OUT/cuda_tests.xml"

# ---- 3c. loss kernels -----------------------------------------------------------------------------
step "loss kernels (bench_losses.py ${LOSS_ARGS[*]})" \
    timeout 240 "$PY" "$ROOT/benchmarks/bench_losses.py" "${LOSS_ARGS[@]}" --json "$OUT/losses.json"

# ---- 4. adversarial training step: TRADES vs IKL-AT, with and without AWP -------------------------
step "adversarial training step (bench_adv.py ${ADV_ARGS[*]})" \
    timeout 240 "$PY" "$ROOT/benchmarks/bench_adv.py" "${ADV_ARGS[@]}" --json "$OUT/adv_steps.json"

# ---- 5. the experiments entry point under torchrun --------------------------------------------------
# One KD grid (kl, ikl; 1 epoch) through `python -m dkl_lib.experiments` under torchrun with one
# process per GPU (nccl; 2 gloo processes in the CPU dry run), on CIFAR-shaped random data held on the
# device with crop + flip done there, bf16 + channels_last, per-epoch checkpoints: the code path of
# a full run, end to end, without a data set.
if [[ "$DEVICE" == "cuda" ]]; then
    NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
    SYN='{"name":"synthetic","n_train":4096,"n_test":1000,"num_classes":10,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    MODELS=()
else
    NPROC=2
    SYN='{"name":"synthetic","n_train":64,"n_test":32,"num_classes":10,"image_shape":[3,32,32],"noise":0.3,"seed":0,"augment":{"padding":4,"flip":true}}'
    MODELS=(--override teacher.model=resnet8x4)
fi
# A teacher that has learned something, at a gentle learning rate: on an H200 the preset's lr 0.1
# for one teacher epoch on 100 random classes left a teacher at chance whose eval-mode logits
# reached thousands under bf16, and the IKL student (alpha 8) diverged chasing them, which tests
# nothing about the code path (the trainer now stops such a run with a 'diverged' error).
KD_SMOKE=(--override teacher.train.epochs=3 --override teacher.train.lr=0.01 --override distill.lr=0.01)
T0=$SECONDS
step "experiments entry point under torchrun ($NPROC processes)" \
    env OMP_NUM_THREADS=1 timeout 240 "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m dkl_lib.experiments kd --preset gpu-short --losses kl,ikl --seeds 0 --epochs 1 --checkpoint-every 1 \
    --override "data=$SYN" "${MODELS[@]}" "${KD_SMOKE[@]}" --cache-dir "$OUT/cache" --out "$OUT/torchrun"
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

# ---- 6b. compiled training step (GPU only, last: it runs only if the budget leaves time for it) -------
# torch.compile of teacher and student (inductor, Triton) against the eager step, kl and ikl, batch 128,
# round-robin in one process; the compilation itself (about a minute per model) is reported apart.
# Not in the CPU dry run, where compiling the two ResNets would take minutes of CPU.
if [[ "$DEVICE" == "cuda" && $QUICK -eq 0 ]]; then
    step "compiled training step (bench_train.py --compile both --losses kl,ikl --batch 128)" \
        timeout 300 "$PY" "$ROOT/benchmarks/bench_train.py" --devices cuda --losses kl,ikl --compile both \
        --batch 128 --reps 10 --warmup 2 --json "$OUT/train_compiled.json"
fi

# ---- 7. summary ----------------------------------------------------------------------------------
STEP="summary"
"$PY" "$ROOT/benchmarks/gpu_check_summary.py" "$OUT" "$DEVICE" "$((SECONDS - START))" | tee "$OUT/summary.md" \
    || { echo "gpu_check: the summary failed; the steps' results are in $OUT" >&2; exit 5; }
exit "$FIRST_RC"
