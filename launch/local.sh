#!/usr/bin/env bash
# Train on this machine with N ranks:
#
#   launch/local.sh [--max-restarts K] [N] [hydra overrides...]
#   launch/local.sh                                  # one rank per core
#   launch/local.sh 4 model=lenet5 trainer.epochs=3  # 4 ranks, even on 2 cores
#   launch/local.sh --max-restarts 3 4 hydra.run.dir=runs/a   # heal by itself
#
# --max-restarts K: when the job dies of something a restart can help (a rank
# killed or stuck, a collective timeout), start it again with
# trainer.resume=auto in the same run directory, up to K times; never after a
# config or data error (exit 2) or a stop signal (exit 143). See launch/restart.sh.
#
# N defaults to the number of cores. More ranks than cores works with no
# flags under MPICH's mpirun (the `mpich` wheel): dpcnn notices the
# oversubscription and waits for the allreduce by polling and sleeping
# instead of spinning (DPCNN_MPI_WAIT=spin|yield|auto overrides), so a
# waiting rank does not steal the core of one still computing. Under Open MPI
# the script adds --oversubscribe (and --allow-run-as-root as root).
#
# Each rank gets one BLAS thread (OMP/OPENBLAS/MKL_NUM_THREADS=1, or
# BLAS_THREADS=k). PYTHON, MPIRUN and MPIRUN_ARGS (extra launcher flags)
# override what is used; see launch/common.sh for how they are found.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/restart.sh"

case "${1:-}" in
    -h | --help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
dpcnn_parse_restarts "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    np="$1"
    shift
else
    np="$(dpcnn_cores)"
fi
(( np >= 1 )) || dpcnn_die "the number of ranks must be >= 1, got $np"

dpcnn_setup
dpcnn_local_flags "$np"
dpcnn_supervise "$MPIRUN" -n "$np" ${LOCAL_FLAGS[@]+"${LOCAL_FLAGS[@]}"} ${BLAS_ENV_FLAGS[@]+"${BLAS_ENV_FLAGS[@]}"} \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$PYTHON" -m dpcnn.train -- "$@"
