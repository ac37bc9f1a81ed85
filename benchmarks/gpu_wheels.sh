#!/usr/bin/env bash
# Download here (where PyPI is reachable) the wheels the GPU machine's image lacks, into .whl/ (git-ignored
# through .git/info/exclude), for its Python 3.12. The device tool then carries .whl and gpu_validate.sh
# installs them. The image already has torch, transformers, accelerate, peft, psutil, nvidia-ml-py, rich.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PY:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in textual mdit-py-plugins linkify-it-py uc-micro-py platformdirs bitsandbytes; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl "$pkg"
done
# DeepSpeed is published as a source package only: build its (pure-Python) wheel here, with its one missing need.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl hjson
if [ -x .venv/bin/python ]; then
    .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(.venv/bin/python -c 'import deepspeed; print(deepspeed.__version__)')"
fi
ls -la .whl
