#!/usr/bin/env bash
# Runs vljax on every worker of a Cloud TPU VM slice; jax detects the pod topology itself.
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/siglip.py:scale=paper --workdir=/mnt/shared/siglip
# Assumes the repository is checked out at ~/vljax on every worker (e.g. with a first
# `--command "git clone ..."` pass) and that the workdir is a file system all workers mount
# (e.g. a bucket through gcsfuse): metrics.jsonl is written with plain file I/O.
set -euo pipefail
name=${1:?usage: $0 TPU_NAME ZONE [vljax.main flags...]}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  "cd ~/vljax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]' && python -m vljax.main $args"
