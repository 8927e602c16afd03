#!/usr/bin/env bash
# Build the sdist and the wheel, install the wheel into an empty venv and use it from outside the checkout:
# a file the package needs at run time but does not ship (the kernels' C source, the attention page's
# assets) fails here, where the editable install of `make test` would never notice.
# Usage: .ci/wheel_check.sh PYTHON TORCH_REQUIREMENT   (the Makefile's `make wheel-check` passes both)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
torch_requirement=${2:-torch==2.13.0}
work=$(mktemp -d -t lm-wheel-check-XXXXXX)
trap 'rm -rf "$work"' EXIT

# Without --sdist/--wheel, build makes the sdist and then the wheel from it: a file missing from the sdist fails too.
"$python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; echo "wheel-check: python -m build failed"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "built $(basename "$sdist") and $(basename "$wheel")"

# One top-level import package, and nothing else at the top of site-packages.
"$python" - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
tops = sorted({name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")})
assert tops == ["lm"], f"the wheel installs {tops}: only 'lm' should be a top-level package"
for needed in ("lm/cpu_kernels.c", "lm/cli/main.py", "lm/cli/assets/attention.html", "lm/cli/assets/attention.js",
               "lm/cli/assets/attention.css"):
    assert needed in names, f"the wheel lacks {needed}"
members = tarfile.open(sdist).getnames()
for needed in ("cli/assets/attention.html", "cli/main.py", "lm/cpu_kernels.c"):
    assert any(member.endswith("/" + needed) for member in members), f"the sdist lacks {needed}"
print(f"wheel: top-level packages {tops}, {len(names)} files; sdist: {len(members)} members")
EOF

"$python" -m venv "$work/venv"
# shellcheck disable=SC2086  # the requirement may carry pip options (--index-url ...)
"$work/venv/bin/python" -m pip install --quiet $torch_requirement
"$work/venv/bin/python" -m pip install --quiet "$wheel"

# From an empty folder, so nothing is imported from the checkout.
cp data/sample.txt "$work/sample.txt"
cd "$work"
lm="$work/venv/bin/lm"
"$lm" --help >/dev/null
"$lm" train sample.txt --out run --preset tiny --n-layer 1 --d-model 32 --context-length 32 --batch-size 4 \
    --vocab-size 300 --max-steps 3 >train.log 2>&1 || { cat train.log; exit 1; }
"$lm" generate run --prompt "The" --max-new-tokens 8 --seed 1 >generate.log 2>&1 || { cat generate.log; exit 1; }
"$lm" inspect-attention run --text "The king is dead" --save page.html >inspect.log 2>&1 \
    || { cat inspect.log; exit 1; }
grep -q "attention" page.html
echo "wheel-check: the installed wheel trains, generates and writes the attention page from outside the checkout"
