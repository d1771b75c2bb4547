#!/bin/bash
# One search worker per GPU, on as many nodes as the array has tasks, all pulling from one PostgreSQL.
#
# Create the studies once (from any host that reaches the database):
#   export STL10_SEARCH_STORAGE=postgresql://search:PASSWORD@db-host:5432/studies
#   stl10-search search --model all --n-trials 200 --workers 0
# Then submit:   sbatch --array=0-7 deploy/slurm_workers.sh
# Each array task holds one GPU (SLURM sets CUDA_VISIBLE_DEVICES) and runs two workers on it,
# which is worth it for the small models; the study's shared budget stops them all at 200 trials.
#SBATCH --job-name=stl10-search
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=logs/worker-%A-%a.out

set -euo pipefail
: "${STL10_SEARCH_STORAGE:?export STL10_SEARCH_STORAGE=postgresql://user:password@host/db before sbatch}"
MODELS=${MODELS:-logreg,mlp,cnn,mobilenet_frozen,mobilenet_finetune}

# Data and pretrained weights are cached per node; a shared file system cache works too.
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/$USER-cache}

# SLURM sends SIGTERM before the time limit: workers stop after their epoch and queue their trial again.
trap 'kill -TERM $(jobs -p) 2>/dev/null; wait' TERM
for k in 1 2; do
  stl10-search worker --model "$MODELS" --device cuda:0 --checkpoint-dir "checkpoints" &
done
wait
