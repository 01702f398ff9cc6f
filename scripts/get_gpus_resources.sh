#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript / spark.driver.resource.gpu...).
# Prints the GPUs this executor may use as Spark's ResourceInformation JSON:
#   {"name": "gpu", "addresses": ["0", "1"]}
# Honours CUDA_VISIBLE_DEVICES when the cluster manager (YARN, Kubernetes device plugin) already
# narrowed the GPUs; otherwise lists every GPU nvidia-smi sees. The PySpark wheel does not ship
# Spark's own examples/src/main/scripts/getGpusResources.sh, hence this copy: ship it to the nodes
# (or bake it into the image) and point the discovery script setting at it.
set -euo pipefail

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
  ids="${CUDA_VISIBLE_DEVICES}"
else
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "get_gpus_resources.sh: nvidia-smi not found and CUDA_VISIBLE_DEVICES unset: no GPU to offer" >&2
    exit 1
  fi
  ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ' | paste -sd, -)
fi
if [[ -z "${ids}" ]]; then
  echo "get_gpus_resources.sh: no GPU found" >&2
  exit 1
fi
printf '{"name": "gpu", "addresses": ["%s"]}\n' "$(printf '%s' "${ids}" | sed 's/,/", "/g')"
