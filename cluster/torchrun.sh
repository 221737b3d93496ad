#!/usr/bin/env bash
# One torchrun per node; run the same command on every node with its own NODE_RANK.
#
#   # node 0 (its address is MASTER_ADDR)           # node 1 ... NNODES-1
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node-001 \     NNODES=4 NODE_RANK=1 MASTER_ADDR=node-001 \
#     bash cluster/torchrun.sh output_dir=/shared/runs/sft    bash cluster/torchrun.sh output_dir=/shared/runs/sft
#
# GPUS_PER_NODE (default 8; 2 on a CPU box), MASTER_PORT (29500), RECIPE (recipes/sft.py).
# torchrun forwards SIGTERM and SIGUSR1 to its ranks, which checkpoint and exit 6; it waits
# SHUTDOWN_TIMEOUT seconds (default 600; torchrun's own default is 30) before it SIGKILLs them,
# so give it longer than one checkpoint save. Relaunch the same command to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${TORCHRUN:-torchrun}" \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}" \
  "${RECIPE:-recipes/sft.py}" "$@"
