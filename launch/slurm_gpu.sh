#!/usr/bin/env bash
# SLURM batch script for GPU clusters: one process per node, all GPUs of the node per process.
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/tldr.py /shared/runs/tldr [--config.x=y ...]
# Needs a venv made once with `make setup && .venv/bin/pip install 'jax[cuda12]'` on shared storage.
# jax.distributed.initialize() reads SLURM's environment (--distributed).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=$1 workdir=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun .venv/bin/python -m p3o_jax.main --distributed --config="$config" --workdir="$workdir" "$@"
