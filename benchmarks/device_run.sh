#!/usr/bin/env bash
# One device-tool call: environment, GPU correctness tests, the overhead probe, then speed benchmarks.
#   run(command="bash benchmarks/device_run.sh '<pytest -k expr or skip>' '<probe lengths or skip>' '<bench args>' ...",
#       carry=[".whl"])
# Each further argument is one invocation of attention_speed.py; results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
tests=${1-skip}; probe=${2-skip}; shift 2 || true
if [ "$tests" != "skip" ]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_mosaic_gpu_device.py ${tests:+-k "$tests"} 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -8
fi
if [ "$probe" != "skip" ]; then
  timeout 200 python3 benchmarks/probe_attention_overhead.py "$probe" 2>&1 | tee "$OUT/probe.txt" | tail -8
fi
for bench in "$@"; do
  timeout 400 python3 benchmarks/attention_speed.py --out-dir "$OUT" $bench 2>&1 | tee -a "$OUT/bench_log.txt" \
    | grep -v '^|'
done
