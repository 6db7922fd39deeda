#!/usr/bin/env bash
# benchmarks/gpu_check.sh for a TPU VM (a v5e-8 host, or one chip), in one command:
#
#   WHEELS=/path/to/wheels bash benchmarks/tpu_check.sh OUT_DIR
#   SMOKE=1 bash benchmarks/tpu_check.sh OUT_DIR    # tiny sizes, to check the script (CPU too)
#   DRY=1 bash benchmarks/tpu_check.sh OUT_DIR      # only print the commands it would run
#
# The same checks and one results file, OUT_DIR/results.md (see gpu_check.sh), except: no
# nvidia-smi and no PyTorch comparison; the bench rows run on 1 chip and on all of the host's
# chips; WHEELS must also hold jax[tpu] and its libtpu wheel:
#   pip download --python-version 3.12 --only-binary=:all: -d wheels \
#     'jax[tpu]' ml-collections grain tensorboardX tensorflow-datasets pytest
set -euo pipefail
KIND=tpu exec bash "$(dirname "$0")/gpu_check.sh" "$@"
