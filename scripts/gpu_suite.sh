#!/usr/bin/env bash
# The GPU run: install, the whole test suite (CUDA branch included), info, bench with peers,
# host overhead. Usage: scripts/gpu_suite.sh OUTDIR [pytest args...]. Writes at most 6 files.
set -u
out=${1:?usage: scripts/gpu_suite.sh OUTDIR [pytest args]}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
  python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -1
  python3 -c "import sys, numpy, cuda.core, cuda.bindings; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cuda.core', cuda.core.__version__, 'cuda.bindings', cuda.bindings.__version__)"
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"
  python3 -m prism_gpu info --backend cuda
} > "$out/card.txt" 2>&1
python3 -m pytest -q -rs -p no:cacheprovider "$@" > "$out/pytest.log" 2>&1
echo "pytest exit $?" >> "$out/pytest.log"
tail -3 "$out/pytest.log"
for w in 2,5,2 3,3,3 0.2,0.2,0.2; do
  python3 -m prism_gpu bench --backend cuda --peers --workload $w --iterations 100
done > "$out/bench.txt" 2>&1
python3 -m prism_gpu bench --backend cuda --peers --workload 2,5,2 --json > "$out/bench_252.json" 2>&1
python3 benchmarks/host_overhead.py --profile > "$out/host.txt" 2>&1
cat "$out/bench.txt" "$out/host.txt" | head -150
