#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE COMMAND [ARGS...]
#   launch/tpu_pod.sh my-v5p-32 us-east5-a sft --config configs/sft/smollm2.yaml mesh.data=1 mesh.fsdp=-1
# Every worker needs this repository at the same path, $REPO (default: jaxreason in the home directory),
# with a virtualenv: python -m venv .venv && .venv/bin/pip install -r requirements.txt -e . 'jax[tpu]'
# (gcloud compute tpus tpu-vm scp/ssh --worker=all do that on all workers at once). gcloud's project
# comes from its configuration or CLOUDSDK_CORE_PROJECT.
#
# jax on a TPU pod is multi-controller: the same program starts on every worker at once, so this ssh's to
# all of them (--worker=all) with one command. A GCE TPU VM keeps its worker list in the metadata server,
# not the environment, so JAXREASON_DISTRIBUTED=auto tells jaxreason.distributed to call
# jax.distributed.initialize() with no arguments and let jax find the other workers there.
set -euo pipefail
(( $# >= 3 )) || { sed -n 2,3p "$0"; exit 2; }
tpu=$1 zone=$2
shift 2
args=$(printf '%q ' "$@")  # quoted once more for the remote shell, so overrides with spaces survive
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ${REPO:-jaxreason} && source .venv/bin/activate && JAXREASON_DISTRIBUTED=auto python -m jaxreason $args"
