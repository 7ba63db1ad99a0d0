#!/usr/bin/env bash
# Prepares the offline GPU machine for the benchmarks: its image has torch and transformers but no
# llm-compressor, and it reaches no network, so the wheels in .whl/ and the corpus files in
# .carry/corpus/ travel with the working tree (fetch them on a connected machine with
# `pip download --no-deps -d .whl llmcompressor==0.14.0.1 compressed-tensors==0.19.0 ...` and
# `cp /usr/share/dictd/gcide.dict.dz .carry/corpus/`).
set -euo pipefail
python -m pip install -q --root-user-action=ignore --no-deps --no-index .whl/*.whl
mkdir -p /usr/share/dictd /usr/share/doc/python3.11/html
cp .carry/corpus/gcide.dict.dz /usr/share/dictd/
tar xzf .carry/corpus/python-doc-sources.tar.gz -C /usr/share/doc/python3.11/html
