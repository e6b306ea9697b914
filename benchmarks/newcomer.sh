#!/usr/bin/env bash
# The newcomer's first run, timed as they meet it: a fresh `git clone` of this checkout into a
# temporary folder, `make demo` (install + demo), then `make test`, with empty pip/uv caches.
#
#   benchmarks/newcomer.sh              # quiet machine
#   benchmarks/newcomer.sh --busy 2     # with two CPU-bound loops running beside it the whole time
#   benchmarks/newcomer.sh --keep       # keep the clone (its demo.log, test.log) instead of deleting it
#   benchmarks/newcomer.sh --no-test    # stop after the demo
#   benchmarks/newcomer.sh --no-yardstick   # skip the workload yardstick after the demo
#
# Prints the wall time of the install, of the demo (with the parts the demo logs) and of the
# tests, and the load average before and after. Beside them, how fast the machine was: a matmul rate
# (before the demo) and, after it, under the same load, the workload yardstick: knowledge injection
# with two one-thread processes side by side (benchmarks/injection_bench.py --side-by-side; issue 30's
# slow day: 1.8-2.1 steps/s each). It runs after the demo because its imports would write the bytecode
# the demo's first imports write. Under a shared load the two rates do not move together.
# What it measures is what `make demo` does: the install is timed as `make setup`, the step
# `make demo` runs first, and the demo straight after it, as `make demo` runs it.
set -euo pipefail

busy=0
keep=0
run_tests=1
yardstick=1
while [ $# -gt 0 ]; do
    case "$1" in
        --busy) busy="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --no-test) run_tests=0; shift ;;
        --no-yardstick) yardstick=0; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "newcomer.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/viker-newcomer-XXXXXX")
hogs=()
cleanup() {
    for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ "$keep" = 0 ]; then rm -rf "$work"; else echo "[newcomer] kept $work/viker"; fi
}
trap cleanup EXIT

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# A newcomer's machine has no caches of ours: the installers' start empty, and so do the caches the demo's
# libraries keep in the home folder (matplotlib's font list, built at its first import; Hugging Face's).
export PIP_CACHE_DIR="$work/pip-cache" UV_CACHE_DIR="$work/uv-cache"
export XDG_CACHE_HOME="$work/xdg-cache" MPLCONFIGDIR="$work/matplotlib"
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')
echo "[newcomer] $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores ($cpu); commit $(git -C "$src" rev-parse --short HEAD)"
git clone -q "$src" "$work/viker"
cd "$work/viker"

for _ in $(seq 1 "$busy"); do
    python3 -c "while True: pass" &
    hogs+=("$!")
done
[ "$busy" -gt 0 ] && echo "[newcomer] $busy CPU-bound loops running beside it"
echo "[newcomer] load before: $(loadavg)"

t=$(now)
make setup > setup.log 2>&1 || { tail -20 setup.log; exit 1; }
install_s=$(since "$t")
echo "[newcomer] install (make setup): ${install_s} s; load $(loadavg)"
grep -E "^\[setup\]" setup.log || true
echo "[newcomer] machine: $(.venv/bin/python "$src/benchmarks/machine.py")"

t=$(now)
make demo > demo.log 2>&1 || { tail -30 demo.log; exit 1; }
demo_s=$(since "$t")
echo "[newcomer] make demo after the install: ${demo_s} s wall; load $(loadavg)"
grep -E "^\[(threads|finetune\] (stopped|vanilla)|precompute\] reference cache|unlearn\] .*runs on .*done|demo\] done)" demo.log \
    | sed 's/^/    /'

if [ "$yardstick" = 1 ]; then
    echo "[newcomer] workload yardstick, same load: $(.venv/bin/python benchmarks/injection_bench.py --steps 30 --side-by-side 2>/dev/null | tail -1)"
fi

if [ "$run_tests" = 1 ]; then
    t=$(now)
    make test > test.log 2>&1 || { tail -30 test.log; exit 1; }
    test_s=$(since "$t")
    echo "[newcomer] make test: ${test_s} s wall ($(tail -1 test.log))"
fi
echo "[newcomer] load after: $(loadavg)"

python3 -c "import sys; i, d = map(float, sys.argv[1:3]); print(f'[newcomer] make demo from nothing: {i + d:.1f} s '
            f'({(i + d) / 60:.1f} min) = install {i:.1f} s + demo {d:.1f} s')" "$install_s" "$demo_s"
