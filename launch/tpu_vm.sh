#!/usr/bin/env bash
# Start training on every worker of a Cloud TPU VM slice; jax.distributed finds the other
# workers from the TPU metadata (LMJAX_DISTRIBUTED=auto), so no coordinator flags are needed.
# The training runs detached (setsid nohup), so it survives the ssh session; each worker
# logs to RUN_DIR/worker-HOSTNAME.log. Running the same command again continues the run.
#
# Once per slice (docs/launch.md): RUN_DIR on a file system every worker sees (Filestore/NFS,
# or a bucket mounted with GCS FUSE), and lmjax installed on every worker from a wheel:
#   pip wheel --no-deps -w dist .
#   gcloud compute tpus tpu-vm scp dist/lmjax-0.1.0-py3-none-any.whl my-v5p-64: --zone us-east5-a --worker=all
#   gcloud compute tpus tpu-vm ssh my-v5p-64 --zone us-east5-a --worker=all --command "pip install 'lmjax-0.1.0-py3-none-any.whl[tpu]'"
#
#   launch/tpu_vm.sh TPU_NAME ZONE RUN_DIR [lmjax train arguments...]
#   launch/tpu_vm.sh my-v5p-64 us-east5-a /mnt/shared/runs/exp1 decoder_tiny --set train.batch_size=64 --set mesh.data=1 --set mesh.fsdp=-1
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; run_dir=${3:?run dir on a shared file system}
shift 3
args=$(printf ' %q' "$@")
dir=$(printf '%q' "$run_dir")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "mkdir -p ${dir} && LMJAX_DISTRIBUTED=auto setsid nohup lmjax train${args} --set train.run_dir=${dir} \
   > ${dir}/worker-\$(hostname).log 2>&1 < /dev/null &"
