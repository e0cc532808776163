#!/usr/bin/env bash
# GPU check of the reference recipe: throughput at 1,000 and 300,000 classes, peak memory within
# 11 GiB, and the memory plan beside each measured peak (see benchmarks/gpu_check.py). It needs
# only the project and its installed dependencies, and no network. `timeout` stops it after
# 8 minutes; a normal run on one GPU takes a few.
#
# Usage: benchmarks/gpu_check.sh [options of benchmarks/gpu_check.py]
#        benchmarks/gpu_check.sh --device cpu --tiny     # a quick run of the script on the CPU
# PYTHON selects the interpreter; the default is .venv/bin/python, else python3.
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then
        python=.venv/bin/python
    else
        python=python3
    fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$python" benchmarks/gpu_check.py "$@"
