#!/usr/bin/env bash
# GPU check, one JSON: the CUDA-only tests; the ViT-B/16 training step at crop 448 (batch 2 and 4, fp32 vs bf16,
# torch.compile on/off: s/iteration, images/s, peak memory, projected wall time of the 20k-iteration VOC run); the
# fp32-vs-bf16 agreement of the thresholded CAM labels; a 300-iteration ViT-B training run on synthetic data that must
# lower the loss. Random weights throughout (model.pretrained=false): nothing is downloaded.
# Usage: OUT=DIR bash scripts/gpu_check.sh [tools.gpu_check options, e.g. --parts bench,train]
#   OUT                   folder for gpu_check.json (default: the current folder); nothing else is written there
#                         (scratch files go to a temporary folder that is removed at the end)
#   GPU_CHECK_TIME_LIMIT  seconds for the whole check (default 480); the JSON is rewritten after every part, a part
#                         that overruns its budget is stopped, parts that no longer fit are skipped
#   PYTHON                interpreter with requirements.txt installed (default: python, else python3)
# Checks torch, CUDA and the other requirements.txt packages first: without them it prints one line saying what is
# missing, records it in the JSON and exits 2.
# Exit code: 0 every part ok (or skipped / unavailable), 1 a part failed or timed out, 2 no torch / CUDA, 124 stopped.
# `python -m tools.gpu_check --help` describes the parts, the time budget and the JSON.
set -euo pipefail
header() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$1"; }
for arg in "$@"; do
    if [[ "${arg}" == -h || "${arg}" == --help ]]; then
        header "${BASH_SOURCE[0]}"
        exit 0
    fi
done
fail() {
    echo "gpu_check: $*" >&2
    exit 2
}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
limit="${GPU_CHECK_TIME_LIMIT:-480}"
[[ "${limit}" =~ ^[0-9]+$ && "${limit}" -gt 0 ]] || fail "GPU_CHECK_TIME_LIMIT must be a positive whole number of seconds, got '${limit}'; nothing was run"
command -v "${python}" >/dev/null 2>&1 || fail "no '${python}' on PATH (set PYTHON to the interpreter with requirements.txt installed); nothing was run"
mkdir -p "${OUT:-.}" || fail "cannot create the output folder '${OUT:-.}'; nothing was run"
out="$(cd "${OUT:-.}" && pwd)/gpu_check.json"
need_cuda=1  # `--device cpu` (a CPU smoke run of the tool) needs torch only
previous=""
for arg in "$@"; do
    if [[ "${arg}" == --device=cpu || ("${previous}" == --device && "${arg}" == cpu) ]]; then
        need_cuda=0
    fi
    previous="${arg}"
done

export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Half the cores, at most 8, per process: the GPU does the work; the rest feed the data loader workers.
cores="$(nproc 2>/dev/null || echo 2)"
threads=$((cores / 2 > 8 ? 8 : cores / 2))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads < 1 ? 1 : threads))}"

# torch, CUDA and the other packages, in one line either way (stderr dropped: a CUDA probe's warnings would make it
# several lines). The others are only looked up, not imported (timm alone takes seconds).
found="$(NEED_CUDA="${need_cuda}" OUT_JSON="${out}" "${python}" - 2>/dev/null <<'EOF'
import importlib.util
import json
import os
import sys

# import names of requirements.txt (pydensecrf2 installs pydensecrf, pillow PIL, opencv cv2, pyyaml yaml)
MODULES = ("torchvision", "timm", "safetensors", "numpy", "PIL", "cv2", "pydensecrf", "pycocotools", "omegaconf",
           "yaml", "tqdm", "tensorboard", "matplotlib", "pytest")


def fail(message):
    print(message)
    report = {"schema": "msfc-gpu-check/1", "status": f"failed: {message}", "complete": False, "parts": {}}
    try:
        tmp = os.environ["OUT_JSON"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, os.environ["OUT_JSON"])
    except OSError:
        pass
    sys.exit(1)


try:
    import torch
except Exception as err:
    fail(f"torch cannot be imported by {sys.executable} ({type(err).__name__}: {err}); install requirements.txt")
missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
if missing:
    fail(f"{sys.executable} lacks {', '.join(missing)} (torch {torch.__version__} is there); install requirements.txt")
if os.environ["NEED_CUDA"] != "1":
    print(f"torch {torch.__version__}, CPU run (--device cpu)")
elif not torch.cuda.is_available():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    fail(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device "
         f"(CUDA_VISIBLE_DEVICES={visible}); run this on a GPU machine")
else:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
)" || fail "${found:-${python} crashed while importing torch}; nothing was run"

echo "gpu_check: ${found}; OMP_NUM_THREADS=${OMP_NUM_THREADS}; limit ${limit} s; writing ${out}"
cd "${root}"
status=0
# The tool keeps to the limit itself; `timeout` is the backstop (SIGTERM: the tool writes its JSON and exits 124).
timeout --signal=TERM --kill-after=15 "$((limit + 30))" \
    "${python}" -m tools.gpu_check --out "${out}" --time-limit "${limit}" "$@" || status=$?
"${python}" - "${out}" <<'EOF' || true
import json
import sys

try:
    with open(sys.argv[1]) as f:
        report = json.load(f)
except (OSError, ValueError) as err:
    sys.exit(f"gpu_check: no readable JSON at {sys.argv[1]} ({err})")
print(f"gpu_check summary: {report.get('status')} after {report.get('elapsed_s')} s -> {sys.argv[1]}")
lines = report.get("summary") or [f"{name}: {part.get('status')}" for name, part in report.get("parts", {}).items()]
for line in lines:
    print("  " + line)
EOF
exit "${status}"
