#!/usr/bin/env bash
# The command to run benchmarks/bench_gpu.py on the lent GPU machine (device tool `run`, with
# carry [".whl"]), from the repository root there; the last line is also what to pass as the
# run's `command`. It installs the wheels regvi needs there and the image lacks (anndata
# 0.12.19 and its dependencies, in .whl/, ignored by git: see "Wheels" below), prints
# nvidia-smi, then runs the benchmark (its own budget is 285 s; `timeout` is the backstop:
# SIGTERM still saves the JSON and prints the tables). Results: $OUT/bench_gpu.json and
# $OUT/bench_gpu.log. Expected wall time there: about 4 minutes, at most about 5.5.
#
# Wheels (Python 3.12, x86_64; made here with `python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_28_x86_64 ... -d .whl NAME==VERSION`): anndata 0.12.19, array-api-compat 1.16.0,
# legacy-api-wrap 1.5, natsort 8.4.0, scverse-misc 0.0.3, session-info2 0.4.1, zarr 3.1.6,
# donfig 0.8.1.post1, google-crc32c 1.9.0, numcodecs 0.16.6. Everything else regvi imports
# (torch, lightning, numpy, scipy, pandas, h5py, pyyaml, safetensors, tqdm, matplotlib) is in
# the image; ray, mlflow, optuna, scanpy, mudata and scib-metrics are imported lazily and are
# not needed here.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; nvidia-smi; set -o pipefail; PYTHONUNBUFFERED=1 timeout -k 15 330 python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
