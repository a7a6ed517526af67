#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels the GPU machine lacks for the real job path:
# pydantic (sllm's config models) and datasets (the backend's data loading), with the
# dependencies that image does not have, for its Python 3.12 on x86-64. They land in .whl/
# (git-ignored), which `run` carries and bench/gpu/run_all.sh installs into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
ls -la .whl
du -sh .whl
