#!/usr/bin/env bash
# GPU acceptance check, one short run (budget: 8 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh OUT_DIR            # LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, needs CUDA
#   bash benchmarks/gpu_check.sh OUT_DIR --shape mid # CPU-feasible parts only (the slow test suite)
# Runs from the repository with the machine's preinstalled torch/transformers (no pip,
# no network): pytest -m gpu, both benchmarks at the shape, and the end-to-end CLI run
# (benchmarks/gpu_e2e.py). Prints a pass/fail summary; JSON and logs go to OUT_DIR.
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR [--shape llava7b|mid]}"
shape=llava7b
[ "${2:-}" = "--shape" ] && shape="${3:?--shape needs a value}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH=. HF_HUB_OFFLINE=1 MPLBACKEND=Agg VIKER_PROGRESS_SECONDS=10
py="${PYTHON:-python}"
declare -a names results
step() {   # step NAME COMMAND...: run, time, record pass/fail
    local name=$1; shift
    local t0=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then r=pass; else r=FAIL; fi
    names+=("$name"); results+=("$r $((SECONDS - t0))s")
    echo "[gpu_check] $name: $r ($((SECONDS - t0))s)"
}
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/versions.txt"
if [ "$shape" = llava7b ]; then
    step pytest_gpu "$py" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/pytest_gpu.xml"
    step precompute_bench "$py" benchmarks/precompute_bench.py --shape llava7b --json "$out/precompute_bench.json"
    step train_bench "$py" benchmarks/train_bench.py --shape llava7b --json "$out/train_bench.json"
fi
step e2e "$py" benchmarks/gpu_e2e.py --shape "$shape" --out "$out/e2e"
# A second family at its real shape (#15): Qwen2.5-VL-7B, random bf16 weights, 448 px pictures.
if [ "$shape" = llava7b ]; then
    step e2e_qwen "$py" benchmarks/gpu_e2e.py --shape qwen7b --out "$out/e2e-qwen"
else
    step e2e_qwen "$py" benchmarks/gpu_e2e.py --shape qwen-mid --out "$out/e2e-qwen"
fi
echo "[gpu_check] summary ($shape):"
fail=0
{
    echo "{\"shape\": \"$shape\", \"steps\": {"
    for i in "${!names[@]}"; do
        echo "  [gpu_check]   ${names[$i]}: ${results[$i]}" >&2
        [ "${results[$i]%% *}" = pass ] || fail=1
        sep=$([ "$i" -lt $((${#names[@]} - 1)) ] && echo , || true)
        echo "  \"${names[$i]}\": \"${results[$i]}\"$sep"
    done
    echo "}}"
} > "$out/summary.json"
[ $fail = 0 ] && echo "[gpu_check] PASS" || echo "[gpu_check] FAIL"
exit $fail
