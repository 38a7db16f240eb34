"""Benchmark scripts of xattn-jax, each run as `python benchmarks/<script>.py ...` or `python -m benchmarks.<script>`.

Shared by them: `benchmarks.common` (timing, fixed-density layouts, relative error, the traced-check scope) and
`benchmarks.result_files` (list and output flags, run metadata, `write_result`: the json at
<out-dir>/<script>/<card>/<date>-<tag>.json and the markdown generated from it). `python -m benchmarks.render
FILE.json` regenerates a result's markdown from its json.
"""
