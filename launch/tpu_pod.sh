#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: the same command on every worker; jax.distributed finds the slice
# from the TPU environment (distributed.initialize=auto).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/qwen_moe.py:qwen3_30b_a3b \
#     --config.model.hf_path=/mnt/ckpt/Qwen3-30B-A3B --config.data.path=/mnt/data/math.jsonl \
#     --config.workdir=gs://bucket/runs/q30b
# Setup once per VM: clone this repo to ~/gspo-jax, then
#   pip install -r requirements.txt && pip install -U "jax[tpu]"
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/gspo-jax}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO && python -m gspo_jax.train $ARGS"
