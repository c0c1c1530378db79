#!/usr/bin/env bash
# The routing benchmark on a GPU: `--quick` sizes, float32, JSON records to $1 (default
# bench_gpu.json). On GPU the 'sorted' backend uses jax.lax.ragged_dot (grouped GEMM).
# Usage: bash scripts/bench_gpu.sh [OUT.json]   (needs jax[cuda]; finishes in < 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_gpu.json}"
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
# The 8-device library-sharding check emulates CPU devices in a subprocess; skip it here.
timeout 300 python scripts/bench_routing.py --quick --parts site,forward,decode,official,train \
  --json "$OUT"
echo "wrote $OUT"
