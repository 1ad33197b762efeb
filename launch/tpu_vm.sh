#!/usr/bin/env bash
# Run p3o_jax on every host of a TPU VM pod slice.
#   launch/tpu_vm.sh <tpu-name> <zone> <config> <workdir> [--config.x=y ...]
# e.g. launch/tpu_vm.sh my-v4-32 us-central2-b configs/tldr.py gs://bucket/runs/tldr
# The repo is copied to every host, set up with `make setup`, and started with --distributed
# (jax.distributed.initialize reads the pod topology itself). Use a gs:// workdir so all
# hosts share checkpoints; add --compile_cache=gs://bucket/jax_cache so a restart loads its programs
# from one cache that process 0 wrote instead of compiling them again.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$(git rev-parse --show-toplevel)" "$tpu":~/p3o_jax
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/p3o_jax && make setup && .venv/bin/pip install -q 'jax[tpu]' &&
  .venv/bin/python -m p3o_jax.main --distributed --config=$config --workdir=$workdir $*"
