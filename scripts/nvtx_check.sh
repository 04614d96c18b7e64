#!/usr/bin/env bash
# Proof that the NVTX ranges exist (no Nsight Systems on the GPU machines): Nsight Compute
# profiles only the kernels launched inside the range of one pipeline stage. Needs ncu and
# the nvtx package. Usage: scripts/nvtx_check.sh
set -u
export PYTHONUNBUFFERED=1
python3 -c "import nvtx" || { echo "nvtx is not importable: pip install 'prism-gpu[nvtx]'"; exit 2; }
for stage in MainCompute Postprocess; do
  log=$(mktemp)
  ncu --nvtx --nvtx-include "prism-gpu@${stage}/" --launch-count 4 \
      --metrics gpu__time_duration.sum python3 examples/pattern2.py > "$log" 2>&1
  profiled=$(grep -E "Context [0-9]+, Stream" "$log" | awk '{print $1}' | sort | uniq -c \
             | tr -s ' ' | tr '\n' ';')
  echo "range ${stage}: kernels profiled: ${profiled:-none}"
  grep -E "pattern 2|==ERROR==|==WARNING==" "$log" | head -3
  rm -f "$log"
done
