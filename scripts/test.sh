#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks tools examples setup.py
exec .venv/bin/python -m pytest -q tests "$@"
