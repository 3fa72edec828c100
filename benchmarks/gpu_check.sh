#!/usr/bin/env bash
# The GPU checks, in one command for a lent GPU machine (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh [OUT_DIR] [SECTIONS]      SECTIONS: any of tests,notebook,phases,bench (default all)
# 1. tests/cuda (skipped on a machine without CUDA), 2. notebook 05 executed in its full setting,
# 3. step_phases.py and 4. memory_time.py on the SD-1.5-sized UNet. Wheels in .whl/ (packages the machine
# lacks, e.g. diffusers and the notebook kernel) are installed first into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
SECTIONS=${2:-tests,notebook,phases,bench}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=python3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, diffusers, peft; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available())"
  nproc; } | tee "$OUT_DIR/machine.txt"
t0=$(date +%s)
lap() { echo "== $1 done at +$(( $(date +%s) - t0 )) s"; }
if [[ $SECTIONS == *tests* ]]; then
  timeout 200 $PY -m pytest -q -p no:cacheprovider tests/cuda 2>&1 \
    | tail -40 > "$OUT_DIR/cuda_tests.txt"; tail -5 "$OUT_DIR/cuda_tests.txt"; lap tests
fi
if [[ $SECTIONS == *notebook* ]]; then
  timeout 300 $PY - "$OUT_DIR" <<'PYEOF' 2>&1 | tail -5; lap notebook
import sys, time, nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/05_stable_diffusion_gpu.ipynb", as_version=4)
t = time.time()
try:
    NotebookClient(nb, timeout=280, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute()
    print(f"notebook 05 executed in {time.time() - t:.0f} s")
finally:
    nbformat.write(nb, f"{sys.argv[1]}/05_executed.ipynb")
PYEOF
fi
if [[ $SECTIONS == *phases* ]]; then
  timeout 200 $PY benchmarks/step_phases.py --device cuda --batch-sizes 1,8 \
    --methods "${PHASE_METHODS:-plain,full,sara,sara-graphs,sara-compiled,sara-backward,sara-compact,sara-compact-compiled,lora4}" \
    --out "$OUT_DIR/step_phases_cuda.csv" \
    > "$OUT_DIR/step_phases.txt" 2>&1
  tail -16 "$OUT_DIR/step_phases.txt"; lap phases
fi
if [[ $SECTIONS == *bench* ]]; then
  timeout 420 $PY benchmarks/memory_time.py --models sd15 --device cuda --steps 10 --rounds 1 \
    --methods "${BENCH_METHODS:-plain,full,sara,sara-graphs,sara-compiled,sara-backward,sara-compact,sara-compact-compiled,sara-compact-backward,lora4}" --once full,lora4 --max-grad-norm none \
    --out "$OUT_DIR/memory_time_cuda_sd15.csv" > "$OUT_DIR/memory_time.txt" 2>&1
  tail -30 "$OUT_DIR/memory_time.txt"; lap bench
fi
