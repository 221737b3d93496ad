#!/usr/bin/env bash
# DeepSpeed's own multi-node launcher: run this once, on the first host of the hostfile. It reaches
# every host over pdsh (or ssh) and starts `deepspeed.launcher.launch` there, one rank per slot.
#
#   HOSTFILE=cluster/hostfile.example bash cluster/deepspeed_multinode.sh output_dir=/shared/runs/sft
#
# Requirements: passwordless ssh from this host to all hosts, the same checkout and Python at the same
# path everywhere, output_dir on a shared filesystem. Environment variables do not travel over pdsh:
# DeepSpeed exports the NCCL_*, PYTHON* and UCX_* variables set here, plus every line of a
# .deepspeed_env file ("NAME=value") in the working directory or your home directory.
# SIGTERM to this launcher reaches the ranks over the ssh sessions; each checkpoints and exits 6.
set -euo pipefail
cd "$(dirname "$0")/.."
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "${HOSTFILE:?set HOSTFILE}")}
exec "${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "${RECIPE:-recipes/sft.py}" "$@"
