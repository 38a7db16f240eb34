#!/usr/bin/env bash
# One device-tool call that checks a change to the forward attention kernel and times it against the previous
# version on the same machine: GPU tests of the kernel, compute-sanitizer (racecheck, memcheck) on its small calls,
# then attention_speed.py with the working tree's kernel ("new") and again with OLD copied over it ("old").
#   git show <commit>:pallas_kernels/block_sparse_attention_mosaic_gpu.py > old_forward.py   # untracked: it travels
#   run(command="OLD=old_forward.py bash benchmarks/device_kernel_ab.sh")
# Time limits per step in seconds (0 skips): TTEST (TESTS: its -k), TSAN (each of TOOLS), TBENCH (each
# attention_speed.py call).
# SHORT and LONG are the two attention_speed.py argument sets run for each version; set empty (SHORT= , LONG= ,
# TOOLS= ) they are skipped (unset: the defaults below).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
KERNEL=pallas_kernels/block_sparse_attention_mosaic_gpu.py
SHORT=${SHORT---lengths 8192,16384,32768 --kv-heads 8 --densities 10,25 --sections sparse --in-jit 32 --repeats 20}
LONG=${LONG---lengths 131072 --kv-heads 8 --densities 10,25 --sections sparse --repeats 20}
step() { [ "$1" != 0 ]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$OUT/env.txt"
step "${TTEST:-150}" && timeout ${TTEST:-150} python3 -m pytest -q -p no:cacheprovider tests/test_mosaic_gpu_device.py \
  -k "${TESTS:-attention_kernel_matches_xla}" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -4
# KILL: on 2026-12-07 a racecheck run ignored timeout's TERM and held the pipe until the call's limit.
for tool in ${TOOLS-racecheck memcheck}; do
  step "${TSAN:-90}" && XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -s KILL ${TSAN:-90} \
    compute-sanitizer --tool $tool python3 benchmarks/sanitize_attention.py forward,noref 2>&1 \
    | tee "$OUT/sanitizer-$tool.txt" | grep -E 'forward|ERROR SUMMARY|RACECHECK SUMMARY|Error' | tail -6
done
for version in new old; do
  if [ $version = old ]; then [ -f "${OLD:-}" ] && cp "$OLD" $KERNEL || break; fi
  for args in "$SHORT" "$LONG"; do
    [ -n "$args" ] || continue  # SHORT= or LONG= (empty) skips that set
    step "${TBENCH:-120}" && timeout ${TBENCH:-120} python3 benchmarks/attention_speed.py $args --out-dir "$OUT" \
      --tag "$version-$(echo "$args" | grep -o 'lengths [0-9,]*' | tr -c '0-9\n' '-' | tr -s '-')" 2>&1 \
      | grep -v '^|' | grep -E 'sparse|dense|Error' | tail -12
  done
done
exit 0
