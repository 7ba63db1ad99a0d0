#!/usr/bin/env bash
# Packaging a user can trust: build the sdist and, from it, the wheel; install the wheel (not this source tree)
# with the quantize extra into a fresh venv; run the installed `intactkv` outside the source tree on
# models/pivot-llama: recipes, a small quantize, eval, inspect; load the checkpoint with transformers alone (the
# start-up hook applies the prefix; INTACTKV_AUTOLOAD=0 does not). Catches missing package data, a missing .pth
# and import-time surprises. Needs network for the fresh venv's packages (pip's cache makes a second run quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quietly.sh
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$work/package.log

echo "building the sdist and the wheel"
quietly "$log" .venv/bin/python -m build --outdir "$work/dist" .
wheel=$(ls "$work"/dist/*.whl)
sdist_files=$(tar tzf "$work"/dist/*.tar.gz)
for recipe in src/intactkv_modifier/recipes/*.yaml; do
  grep -q "/$recipe\$" <<< "$sdist_files" || { echo "the sdist lacks $recipe" >&2; exit 1; }
done

echo "installing $(basename "$wheel")[quantize] into a fresh venv"
quietly "$log" "${PYTHON:-python3}" -m venv "$work/venv"
quietly "$log" "$work/venv/bin/python" -m pip install -c constraints.txt torch
quietly "$log" "$work/venv/bin/python" -m pip install -c constraints.txt "$wheel[quantize]"

echo "running the installed intactkv"
cd "$work"  # away from src/: only the installed package can be imported
intactkv=$work/venv/bin/intactkv
"$intactkv" recipes
"$intactkv" quantize "$root/models/pivot-llama" --recipe gptq-w4a16 --out ckpt --dataset "$root/README.md" \
  --num-samples 4 --seq-len 128
"$intactkv" eval ckpt --reference "$root/models/pivot-llama" --text-file "$root/docs/serving.md" \
  --windows 4 --seq-len 128 -q
"$intactkv" inspect ckpt -q

echo "loading the checkpoint with transformers alone: the prefix with the start-up hook, none with INTACTKV_AUTOLOAD=0"
if ! ls "$work"/venv/lib/python*/site-packages/intactkv-modifier-autoload.pth > /dev/null 2>&1; then
  echo "the wheel did not install intactkv-modifier-autoload.pth into site-packages" >&2
  exit 1
fi
# prints "<prefix applied> <package imported>" for ckpt, loaded by a program that never imports intactkv_modifier
has_prefix='import sys; from transformers import AutoModelForCausalLM as M; m = M.from_pretrained(sys.argv[1])
print(any(hasattr(module, "intact_key") for module in m.modules()), "intactkv_modifier" in sys.modules)'
load_plainly() {
  "$work/venv/bin/python" -c "$has_prefix" ckpt 2> "$work/load.log" | tail -n 1 || { tail -n 20 "$work/load.log" >&2; return 1; }
}
found=$(load_plainly)
[ "$found" = "True True" ] || { echo "transformers alone loaded ckpt without its prefix ($found)" >&2; exit 1; }
found=$(INTACTKV_AUTOLOAD=0 load_plainly)
[ "$found" = "False False" ] || { echo "INTACTKV_AUTOLOAD=0 did not turn the hook off ($found)" >&2; exit 1; }
if "$intactkv" inspect "$root/models/pivot-llama" -q > /dev/null; then
  echo "inspect passed a folder without IntactKV" >&2
  exit 1
fi
echo "package check passed"
