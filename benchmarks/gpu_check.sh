#!/usr/bin/env bash
# The GPU table of docs/performance.md in one go: at most 8 minutes on one GPU (the per-row limits add up to
# 480 s; rows that run out print "not measured").
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with one CUDA GPU
#   OFFICIAL=/path/to/released/code bash benchmarks/gpu_check.sh   # adds the released code's step
#
# Every row is `dkel bench` (DKEL, ResNet-32, 100 classes, 3 peers, bf16 autocast, channels-last,
# fused SGD, batch 128 unless said otherwise) against a plain ResNet-32 step timed in the same
# process; each command has its own time limit so one slow compilation cannot eat the budget.
# OFFICIAL is an export of the released DKEL code (git archive of commit 656c460); the driver is
# ../shared/tools/bench_official.py (or $SHARED/tools/bench_official.py).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dkel-inductor}  # the CUDA-graph row reuses the compiled kernels
OUT=$(mktemp -d)
COMMON=(--device cuda --method dkel --model resnet32 --num-classes 100 --peers 3 --json)

row() {  # row NAME SECONDS bench-arguments...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$PY" -m dkel bench "${COMMON[@]}" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; then
    tail -n 1 "$OUT/$name.out" > "$OUT/$name.json"
  else
    echo "{\"failed\": \"$(tail -n 1 "$OUT/$name.err" | tr -d '"\\' | cut -c1-160)\"}" > "$OUT/$name.json"
  fi
  echo "  $name: $((SECONDS - t0)) s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" >&2
row eager_unpacked 45 --batch-size 128 --warmup 20 --iters 200 --rounds 4 packed=false
row eager_packed 45 --batch-size 128 --warmup 20 --iters 200 --rounds 4 --profile packed=true
row compiled_packed 120 --batch-size 128 --warmup 10 --iters 200 --rounds 4 --compile packed=true
row cudagraph_packed 90 --batch-size 128 --warmup 10 --iters 200 --rounds 4 --compile --profile \
    packed=true compile_mode=reduce-overhead
row preset_packed 75 --batch-size 128 --warmup 20 --iters 100 --rounds 2 --processes 8 packed=true
row batch1024_packed 45 --batch-size 1024 --warmup 5 --iters 40 --rounds 2 packed=true

OFFICIAL_DRIVER=${SHARED:-../shared}/tools/bench_official.py
if [ -n "${OFFICIAL:-}" ] && [ -f "$OFFICIAL_DRIVER" ]; then
  t0=$SECONDS
  timeout 60 "$PY" "$OFFICIAL_DRIVER" "$OFFICIAL" --device cuda --compare-plain --skip-data --warmup 20 \
      --iters 200 --rounds 4 > "$OUT/official.out" 2> "$OUT/official.err" || true
  echo "  official: $((SECONDS - t0)) s" >&2
else
  echo "released code not measured: set OFFICIAL to its export (and SHARED if ../shared is elsewhere)" > "$OUT/official.out"
fi

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [("eager, unpacked (packed=false)", "eager_unpacked"), ("eager, packed", "eager_packed"),
        ("packed + torch.compile (whole step)", "compiled_packed"),
        ("packed + compile, CUDA graphs (compile_mode=reduce-overhead)", "cudagraph_packed"),
        ("throughput preset, 8 processes, packed (sum)", "preset_packed"),
        ("batch 1024, packed, eager", "batch1024_packed")]
official = (out / "official.out").read_text()
match = re.search(r"official_dkel_\S+ img/s: ([\d.]+)", official)
released = float(match.group(1)) if match else None
print("| DKEL ResNet-32, bf16 | img/s | vs released code | ms/step | plain img/s (same run) | ratio to plain "
      "| kernels/step (plain) | peak GPU MiB |")
print("|---|---|---|---|---|---|---|---|")
if released:
    print(f"| released DKEL code, batch 128 | {released:,.0f} | 1.00 | | | | | |")
for label, name in rows:
    r = json.loads((out / f"{name}.json").read_text() or "{}")
    if "img_per_s" not in r:
        print(f"| {label} | not measured: {r.get('failed', 'no output')} | | | | | | |")
        continue
    vs = f"{r['img_per_s'] / released:.2f}" if released else "-"
    kernels = (f"{r['kernels_per_step']:,.0f} ({r['plain_kernels_per_step']:,.0f})"
               if "kernels_per_step" in r else "")
    print(f"| {label} | {r['img_per_s']:,.0f} | {vs} | {r['step_ms']:.1f} | {r['plain_img_per_s']:,.0f} "
          f"| {r['ratio_to_plain']:.3f} | {kernels} | {r.get('peak_gpu_mib', 0):,.0f} |")
if not released:
    print(f"\n{official.strip().splitlines()[-1] if official.strip() else 'released code: no output'}")
EOF
echo "raw outputs in $OUT" >&2
