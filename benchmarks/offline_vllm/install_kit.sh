#!/bin/bash
# Assemble and install the offline vLLM 0.26.0 kit on the GPU machine (no network).
# Expects every piece (vllm-parts/*, gpu-wheels/b0/*, gpu-wheels/b1/*) and this folder's files gathered flat in $KIT.
#   KIT=/tmp/kit PY=python3 REPO=$PWD bash /tmp/kit/install_kit.sh [--smoke] [--serve]
set -euo pipefail
KIT=${KIT:-/tmp/kit}
PY=${PY:-python3}          # the image's python3 (/opt/torch/.venv/bin/python3) - the one that holds torch
REPO=${REPO:-$PWD}         # repository root (intactkv-modifier is installed from it, editable)
V=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
X=xgrammar-0.2.3-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
cd "$KIT"

if sha256sum -c --quiet SHA256SUMS.wheels >/dev/null 2>&1; then
    echo "== 1-2. wheels already assembled and verified"
else
    echo "== 1. pieces"
    sha256sum -c --quiet SHA256SUMS.pieces
    echo "== 2. reassemble the split wheels"
    cat $V.part?? > $V
    cat $X.part?? > $X
    sha256sum -c --quiet SHA256SUMS.wheels   # vllm: adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
    rm -f ./*.part??
fi

echo "== 3. install into $($PY -c 'import sys; print(sys.executable)') (no index, no deps: nothing of the image is replaced)"
n=$(ls ./*.whl | wc -l); [ "$n" -eq 34 ] || { echo "expected 34 wheels, found $n"; exit 1; }
$PY -m pip install -q --no-index --no-deps --no-compile ./*.whl

echo "== 4. intactkv-modifier, editable, same interpreter (its vllm.general_plugins entry point must be registered)"
if ! (cd "$REPO" && $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .); then
    # fallback when the image's setuptools cannot build the editable install: a .pth line and a dist-info by hand
    echo "editable install failed: registering the source folder and the entry point by hand"
    SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$REPO/src" > "$SP/intactkv_modifier_src.pth"
    D="$SP/intactkv_modifier-0.1.0.dist-info"; mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: intactkv-modifier\nVersion: 0.1.0\n' > "$D/METADATA"
    printf '[vllm.general_plugins]\nintactkv = intactkv_modifier.serving.vllm_plugin:register\n\n[console_scripts]\nintactkv = intactkv_modifier.cli.app:main\n' > "$D/entry_points.txt"
    echo "pip" > "$D/INSTALLER"; : > "$D/RECORD"
fi

echo "== 5. checks"
cd "$REPO" && $PY "$KIT/check_kit.py" "$@"
