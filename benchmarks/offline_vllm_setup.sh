#!/usr/bin/env bash
# Installs vLLM 0.26.0 (built for torch 2.11, which the GPU machine's image has) on the offline GPU
# machine. Its 304 MB wheel exceeds what one device call carries (64 MiB with the working tree), so it
# travels in 39 MB pieces (`split -b 39000000 -d vllm-0.26.0-*.whl part_`), one call each, copied to
# $VLLM_STAGING/parts/ while the machine stays warm; the dependencies the image lacks (fetched with
# `pip download --no-deps`, see the README's "Serving" section) go to $VLLM_STAGING/wheels/.
# Run after benchmarks/offline_gpu_setup.sh (llm-compressor and its compressed-tensors 0.19.0, kept:
# vLLM pins 0.17.0 but serves these checkpoints with 0.19.0).
set -euo pipefail
staging=${VLLM_STAGING:-/root/vllm-staging}
wheel=/tmp/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
cat "$staging"/parts/part_* > "$wheel"
echo "adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de  $wheel" | sha256sum --check --quiet
python -m pip install -q --root-user-action=ignore --no-deps --no-index "$staging"/wheels/*.whl "$wheel"
# the package itself, so that vLLM finds its `vllm.general_plugins` entry point
python -m pip install -q --root-user-action=ignore --no-deps --no-index --no-build-isolation -e .
