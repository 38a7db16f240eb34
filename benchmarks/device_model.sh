#!/usr/bin/env bash
# One device-tool call for the model at long context, most important first: 128K TTFT (dense and XAttention near
# 10% density, one-shot and chunked, stride 8 and 16), decode, 256K, the context-parallel op at P = 1, then a GPU
# buffer report of a 2-layer 32K prefill. Each step has its own time limit (seconds, 0 skips it); the defaults fill
# one 600 s call. The decode step spends ~100 s on setup (random 8B weights, copy bandwidth, compiles).
# Optional steps first, off unless given a limit: TTEST (GPU tests of default dispatch, export, dense and the
# estimators; TESTS overrides the -k expression), TEST_SPEED (estimator_speed.py), TCOMP (probe_compile.py: compile
# time per layer count, program and XLA flag; COMPARGS replaces its probe set), T32 (8K and 32K TTFT). DECPROF=N
# prints where a decode step's device time goes (the N largest ops per profile line), PROF=N the same for one 128K
# prefill of the dense and of each stride's XAttention one-shot model. DUMPDEC (seconds) dumps the B=8 decode loop's
# optimized HLO and buffer report (the copies that make its temporaries half a KV cache); DUMPPRE (seconds) the
# 1-layer 128K XAttention prefill's optimized HLO (STRIDE, default 16), to name its MemcpyD2D copies. QCHUNK sets
# XAttention's query chunk in the 128K step (131072: one chunk, no per-chunk copies, ~2x the default's tables).
#   run(command="bash benchmarks/device_model.sh")                     # the model steps
#   run(command="MODES=one-shot T128=240 TDEC=200 T256=120 bash benchmarks/device_model.sh")
#   run(command="TTEST=240 TEST_SPEED=120 TCOMP=200 T128=0 TDEC=0 T256=0 bash benchmarks/device_model.sh")
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
quiet() { grep -v '^|' | grep -E '^ +[0-9]|^decode|^dense|^xattention|Error|error' | tail -${QUIET_LINES:-24}; }
step() { [ "$1" != 0 ]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$OUT/env.txt"
step "${TTEST:-0}" && timeout ${TTEST:-0} python3 -m pytest -q -p no:cacheprovider tests/test_dense_device.py \
  tests/test_export.py tests/test_mosaic_gpu_device.py -k "${TESTS:-default_dispatch or public_op or export or dense or alternating}" \
  2>&1 | tee "$OUT/gpu_tests.txt" | tail -6
step "${TEST_SPEED:-0}" && timeout ${TEST_SPEED:-0} python3 benchmarks/estimator_speed.py --out-dir "$OUT" 2>&1 \
  | grep -E '^ +[0-9]|Error|error'
compile_probe() { timeout ${TCOMP:-0} python3 benchmarks/probe_compile.py "$@" 2>&1 | grep -E '^(dense|xattention|holding)|Error'; }
if step "${TCOMP:-0}" && [ -n "${COMPARGS:-}" ]; then  # one probe set of your choice, e.g. --hold-gib 0,40
  compile_probe $COMPARGS | tee "$OUT/compile.txt"
elif step "${TCOMP:-0}"; then  # compile time of the 128K programs: per layer count, program and XLA flag
  { compile_probe --layers 1,32 --programs prefill,extend --kinds xattention,dense
    XLA_FLAGS=--xla_gpu_autotune_level=0 compile_probe --layers 32
    XLA_FLAGS=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_NO_UNROLL compile_probe --layers 32
  } | tee "$OUT/compile.txt"
fi
step "${T128:-300}" && timeout ${T128:-300} python3 benchmarks/model_prefill.py --lengths 131072 \
  ${EXTRA128---extra-stride 16} ${QCHUNK:+--query-chunk-size $QCHUNK} --no-natural --target-densities ${TARGETS:-0.1} --modes ${MODES:-one-shot,chunked} \
  --prefill-profile ${PROF:-0} --out-dir "$OUT" --tag 128k --repeats 1 2>&1 | QUIET_LINES=${QUIET128:-24} quiet
step "${TDEC:-200}" && timeout ${TDEC:-200} python3 benchmarks/model_prefill.py --sections decode \
  --decode-contexts 32768,131072 --decode-batches ${DECB:-1,8} --decode-profile ${DECPROF:-0} --out-dir "$OUT" \
  --tag decode 2>&1 | quiet
step "${T32:-0}" && timeout ${T32:-0} python3 benchmarks/model_prefill.py --lengths 8192,32768 --no-natural \
  --target-densities ${TARGETS:-0.1} --modes one-shot,chunked --out-dir "$OUT" --tag 8k-32k --repeats 3 2>&1 | quiet
step "${T256:-120}" && timeout ${T256:-120} python3 benchmarks/model_prefill.py --lengths 262144 --kinds xattention \
  --no-natural --modes one-shot --target-densities 0.1 --out-dir "$OUT" --tag 256k 2>&1 | quiet
step "${TCP:-0}" && timeout ${TCP:-50} python3 benchmarks/context_parallel.py --lengths 131072 --devices 1 \
  --repeats 5 --out-dir "$OUT" --tag p1-128k 2>&1 | grep -E '^ +[0-9]|Error|error' | tail -4
step "${DUMP:-0}" && timeout ${DUMP:-30} python3 benchmarks/prefill_memory.py --layers 2 --lengths 32768 \
  --chunk-sizes 0 --kinds dense --dump /tmp/xla-dump 2>&1 | quiet
step "${DUMP:-0}" && ls -S /tmp/xla-dump/*memory-usage-report* 2>/dev/null | head -1 | \
  xargs -r -I{} cp {} "$OUT/memory-report-2l-32k.txt"
if step "${DUMPDEC:-0}"; then  # the decode loop at B=8, 2 layers, 32K: its temporaries, buffers and copies named
  XLA_FLAGS="--xla_dump_to=/tmp/xla-dec --xla_dump_hlo_as_text" timeout ${DUMPDEC} python3 benchmarks/probe_compile.py \
    --programs decode --kinds dense --batch 8 --layers 2 --length 32768 2>&1 | grep -E '^dense|Error' | tee "$OUT/decode-b8.txt"
  ls -S /tmp/xla-dec/*memory-usage-report* 2>/dev/null | head -1 | xargs -r -I{} cp {} "$OUT/memory-report-decode-b8.txt"
  ls -S /tmp/xla-dec/*after_optimizations.txt 2>/dev/null | head -1 | xargs -r -I{} grep -E ' (copy|transpose)(-start)?\(|while\(|custom-call' {} \
    | cut -c1-400 > "$OUT/decode-b8-copies.txt"
  ls -S /tmp/xla-dec/*after_optimizations.txt 2>/dev/null | head -1 | xargs -r -I{} sh -c 'gzip -c {} > "$OUT/decode-b8-hlo.txt.gz"'
fi
if step "${DUMPPRE:-0}"; then  # the 1-layer 128K XAttention one-shot prefill: its copies and conditionals named
  XLA_FLAGS="--xla_dump_to=/tmp/xla-pre --xla_dump_hlo_as_text" timeout ${DUMPPRE} python3 benchmarks/probe_compile.py \
    --programs prefill --kinds xattention --stride ${STRIDE:-16} --layers 1 --length 131072 2>&1 | grep -E '^xatt|Error' \
    | tee "$OUT/prefill-1l.txt"
  ls -S /tmp/xla-pre/*after_optimizations.txt 2>/dev/null | head -1 | xargs -r -I{} sh -c 'gzip -c {} > "$OUT/prefill-1l-hlo.txt.gz"'
fi
exit 0
