#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM slice; jax.distributed finds the other workers
# from the TPU metadata (TPU_WORKER_HOSTNAMES), so no coordinator flags are needed.
#
#   launch/tpu_vm.sh TPU_NAME ZONE RUN_DIR [lmjax train arguments...]
# RUN_DIR must be a path every worker sees (NFS/Filestore, or a bucket mounted with GCS FUSE).
#   launch/tpu_vm.sh my-v5p-64 us-east5-a /mnt/shared/runs/exp1 decoder_tiny --set mesh.fsdp=-1 --set mesh.data=1
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; run_dir=${3:?run dir on a shared file system}
shift 3
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/lmjax && pip install -q -e '.[tpu]' && LMJAX_DISTRIBUTED=auto lmjax train${args} --set train.run_dir=${run_dir}"
