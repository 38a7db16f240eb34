#!/usr/bin/env bash
# The multi-GPU run (issue #20) on a multi-GPU kind, in two device-tool calls of < 600 s each. Each step has its own
# time limit (seconds, 0 skips it):
#   TCP    context_parallel.py at 256K and 1M tokens on 1, 2, 4, ... devices (every power of two up to the GPUs here):
#          time, per-device memory, bytes received, largest difference from the unsharded op (default 400);
#   TMULTI multi_gpu.py: the op and a small model split by heads and by batch, against one GPU (default 160);
#   TMODEL model_prefill_sharded.py: the Llama-3.1-8B shape's 128K prefill, dense and XAttention near 10% density,
#          on one GPU and split by heads, by the sequence and (4+ GPUs) both; TTFT, memory, logits (default 0).
#   run(kind="nvidia-h200-x8", command="bash benchmarks/device_multi_gpu.sh")
#   run(command="TCP=0 TMULTI=0 TMODEL=560 bash benchmarks/device_multi_gpu.sh")
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
step() { [ "$1" != 0 ]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.device_count(), 'devices')" | tee -a "$OUT/env.txt"
n=$(python3 -c "import jax; print(jax.device_count())")
devices=1
for ((p = 2; p <= n; p *= 2)); do devices="$devices,$p"; done
step "${TCP:-400}" && timeout ${TCP:-400} python3 benchmarks/context_parallel.py --lengths 262144,1048576 \
  --devices $devices --repeats ${CP_REPEATS:-3} --out-dir "$OUT" --tag ${n}gpu 2>&1 | tail -24
step "${TMULTI:-160}" && timeout ${TMULTI:-160} python3 benchmarks/multi_gpu.py --out-dir "$OUT" --tag ${n}gpu 2>&1 \
  | tail -14
step "${TMODEL:-0}" && timeout ${TMODEL:-0} python3 benchmarks/model_prefill_sharded.py --length 131072 \
  ${MESHES:+--meshes $MESHES} --out-dir "$OUT" --tag 128k-${n}gpu 2>&1 | tail -24
exit 0
