#!/usr/bin/env bash
# Device call: remaining GPU tests, compute-sanitizer on one small call per variant, the overhead probe.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_mosaic_gpu_device.py -k "${1:-B2T640 or end_to_end}" 2>&1 | tail -4
for tool in memcheck racecheck; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 150 \
    compute-sanitizer --tool $tool --print-limit 20 python3 benchmarks/sanitize_attention.py > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "== $tool rc=$?"; grep -E "ERROR SUMMARY|causal=|Error|error" "$OUT/sanitizer_$tool.txt" | head -8
done
timeout 150 python3 benchmarks/probe_attention_overhead.py 1024,8192,32768 2>&1 | tail -8
