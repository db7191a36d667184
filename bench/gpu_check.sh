#!/usr/bin/env bash
# One GPU check, prepared to run once in a short slot on a CUDA machine:
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default: gpu_check_results/)
#
# 1. installs the project into .venv (scripts/setup.sh: the CUDA build of torch where
#    nvidia-smi works) unless SKIP_SETUP=1;
# 2. records the machine (nvidia-smi, torch/CUDA versions) in OUT/machine.txt;
# 3. runs the CUDA-marked tests (`pytest -m cuda`: capture == hook_pattern on the GPU, fast
#    path == exact mode on the GPU, bf16/fp16 metrics within tolerance of float32, the numpy
#    and torch kernels agree) -> OUT/pytest_cuda.txt and OUT/junit_cuda.xml;
# 4. runs the benchmark on the GPU (`python -m bench.run --device cuda --quick` by default,
#    BENCH_FULL=1 for the full run) -> OUT/bench.json, OUT/BENCHMARKS_gpu.md, OUT/bench.log;
#    BENCH_LONG=1 adds the full-size sequence-length section (`python -m bench.run --only
#    scaling`: capture ÷ forward at 128..4096 tokens) -> OUT/lengths.json, OUT/lengths.md.
# 5. long contexts: the blocked attention capture against the eager hook_pattern capture
#    (`pytest tests/long`: on the CPU the tiny families and the default model, and with -m cuda
#    the same on the GPU, plain, query-scaled and padded) -> OUT/pytest_long.txt, and the long
#    benchmark on the GPU (`python bench/long.py --device cuda`: time and peak GPU memory of the
#    blocked capture against the hook-free SDPA forward at 2k/4k/8k tokens) -> OUT/long.md,
#    OUT/long.log (LONG_LENGTHS overrides the lengths); Qwen2.5-Coder-0.5B at 16k/32k tokens
#    where it is in the cache -> OUT/long_qwen.md.
# Every step's exit code goes to OUT/status.txt; a failing step does not stop the later ones.
# Time budget (H100/H200 class, default model): setup 2-5 min (pip cache cold), tests ~1 min,
# quick benchmark ~2 min, tests/long ~2 min, long benchmark ~3 min (13 fresh processes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_results}
mkdir -p "$OUT"
PY=${VENV:-.venv}/bin/python
STATUS="$OUT/status.txt"
: > "$STATUS"
step() {  # step NAME CMD...: run, log the exit code, never abort the script
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$STATUS"
  return 0
}

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  step setup ./scripts/setup.sh
fi

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'PY'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, round(p.total_memory / 2**30, 1), "GiB")
PY
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch: the CUDA tests would all be skipped" | tee -a "$STATUS"
fi

step tests_cuda "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider \
  --junitxml="$OUT/junit_cuda.xml" tests > "$OUT/pytest_cuda.txt" 2>&1
tail -5 "$OUT/pytest_cuda.txt"

BENCH_ARGS=(--device cuda --out "$OUT/bench.json" --markdown "$OUT/BENCHMARKS_gpu.md")
if [ "${BENCH_FULL:-0}" != "1" ]; then
  BENCH_ARGS+=(--quick)
fi
step bench "$PY" -m bench.run "${BENCH_ARGS[@]}" > "$OUT/bench.log" 2>&1
tail -15 "$OUT/bench.log"
if [ "${BENCH_LONG:-0}" = "1" ]; then  # capture ÷ forward at 128..4096 tokens
  step bench_lengths "$PY" -m bench.run --device cuda --only scaling --out "$OUT/lengths.json" \
    --markdown "$OUT/lengths.md" > "$OUT/lengths.log" 2>&1
fi

step tests_long "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit_long.xml" \
  tests/long > "$OUT/pytest_long.txt" 2>&1
tail -5 "$OUT/pytest_long.txt"
# shellcheck disable=SC2086
step bench_long "$PY" bench/long.py --device cuda --lengths ${LONG_LENGTHS:-2048 4096 8192} \
  > "$OUT/long.md" 2> "$OUT/long.log"
cat "$OUT/long.md"
# Qwen2.5-Coder-0.5B at 16k and 32k where its wheels are in the cache (QWEN_LONG=0 skips it)
if [ "${QWEN_LONG:-1}" = "1" ] && [ -d "${HOME}/.cache/spectra_lens/models/Qwen2.5-Coder-0.5B-Instruct" ]; then
  step bench_long_qwen "$PY" bench/long.py --device cuda --model Qwen2.5-Coder-0.5B-Instruct \
    --lengths 16384 32768 --kinds sdpa blocked > "$OUT/long_qwen.md" 2> "$OUT/long_qwen.log"
  cat "$OUT/long_qwen.md"
fi

echo "results in $OUT/:"; ls -l "$OUT"
cat "$STATUS"
