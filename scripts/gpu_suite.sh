#!/usr/bin/env bash
# The GPU verification run: install, the whole test suite (CUDA branch included), the examples
# and compute-sanitizer over a short Pattern 1 and pipeline. Usage: scripts/gpu_suite.sh OUTDIR
# Writes OUTDIR/gpu-run.log (card, driver, versions, pass/skip counts, sanitizer summaries).
set -u
out=${1:?usage: scripts/gpu_suite.sh OUTDIR}
mkdir -p "$out"
log="$out/gpu-run.log"
export PYTHONUNBUFFERED=1
{
  echo "# prism-gpu GPU run, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
  python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -1
  python3 -c "import sys, numpy, cuda.core, cuda.bindings; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cuda.core', cuda.core.__version__, 'cuda.bindings', cuda.bindings.__version__)"
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"
  echo; echo "## pytest (all tests; the backend fixture's CUDA branch and cuda-marked tests run here)"
  python3 -m pytest -q -rs -p no:cacheprovider 2>&1 | grep -v '^\.*\s*\[' | tail -40
  echo; echo "## pytest tests/test_cuda.py with PRISM_GPU_NATIVE_DRIVER=0 (driver calls through cuda.core)"
  PRISM_GPU_NATIVE_DRIVER=0 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3
  echo; echo "## pytest tests/test_cuda.py with PRISM_GPU_COMPILED=0 (the engine's Python core)"
  PRISM_GPU_COMPILED=0 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3
  python3 -c "import prism_gpu._core as c; print('compiled core:', c.STATUS)"
  echo; echo "## examples"
  for f in examples/*.py; do python3 "$f" 2>&1 | tail -2; done
  for tool in memcheck racecheck synccheck; do
    echo; echo "## compute-sanitizer --tool $tool scripts/sanitize.py"
    timeout 240 compute-sanitizer --tool $tool python3 scripts/sanitize.py 2>&1 | tail -4
  done
} > "$log" 2>&1
tail -60 "$log"
