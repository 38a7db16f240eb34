#!/usr/bin/env bash
# One device-tool call: environment, GPU correctness tests, then the speed benchmark. Results land in $OUT.
#   run(command="bash benchmarks/device_run.sh '<pytest -k expr>' '<attention_speed.py args>'", carry=[".whl"])
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
tests=${1:-}
bench=${2:-}
if [ "$tests" != "skip" ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_mosaic_gpu_device.py ${tests:+-k "$tests"} 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -25
fi
if [ -n "$bench" ] && [ "$bench" != "skip" ]; then
  timeout 420 python3 benchmarks/attention_speed.py --out-dir "$OUT" $bench 2>&1 | tee "$OUT/bench_log.txt" | grep -v '^|'
fi
