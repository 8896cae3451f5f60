#!/usr/bin/env bash
# Train over several machines with MPICH's mpirun (the `mpich` wheel's hydra):
#
#   launch/multihost.sh [--max-restarts K] HOSTFILE N [hydra overrides...]
#   launch/multihost.sh launch/hosts.example 16 trainer.epochs=20 \
#       data.root=/shared/data tracking.uri=http://node1:5000
#
# HOSTFILE lists host:slots lines (see launch/hosts.example). mpirun starts
# one proxy per host with `ssh HOST` (LAUNCHER=ssh, the default: passwordless
# ssh from this machine to every host); LAUNCHER=fork starts every proxy on
# this machine (testing), LAUNCHER=rsh|slurm|... as MPICH's -launcher. Names
# that are this machine (localhost, 127.0.0.1, its hostname) are started
# without ssh even with LAUNCHER=ssh.
#
# Every host needs, at the SAME paths as here: this checkout (or dpcnn
# installed), the virtualenv with dpcnn's dependencies and the same mpich
# wheel (mpirun/hydra_pmi_proxy are looked up in it on each host), and the
# dataset under data.root / DPCNN_DATA_DIR: all ranks read it, rank 0
# downloads it if missing, so put it on a shared filesystem or copy it to
# every host first. Rank 0 (on the first host) writes the run directory and
# the MLflow records: run from a shared directory, or give hydra.run.dir= a
# shared path and tracking.uri= / MLFLOW_TRACKING_URI an `mlflow server`.
# The whole environment of this shell is passed to every rank (MPICH's
# default, -genvall), so DPCNN_DATA_DIR, MLFLOW_TRACKING_URI, PYTHONPATH
# and VIRTUAL_ENV set here hold there too; the BLAS pin (one thread per rank,
# BLAS_THREADS=k to change) is passed explicitly with -genv.
#
# IFACE=eth0 picks the network when a host has several (a management and a
# fast network, docker0, ...): hydra's control connections use it (-iface) and
# so does MPI's data, through UCX_NET_DEVICES (the UCX netmod MPICH's wheel
# uses by default) and FI_TCP_IFACE (its OFI netmod over TCP) unless those are
# set. UCX_NET_DEVICES=eth0 keeps UCX on that device only: on an InfiniBand
# cluster set MPIRUN_ARGS="-iface eth0" instead and let UCX pick the HCA.
# Under Open MPI, IFACE gives --mca oob/btl_tcp_if_include, and the variables
# that matter (DPCNN_*, MLFLOW_TRACKING_URI, UCX_*, FI_*) are passed with -x.
# To try all this on one machine: launch/emulated-cluster.sh.
#
# --max-restarts K: start the job again with trainer.resume=auto in the same
# run directory when it dies of something a restart can help (a killed or
# stuck rank, a lost host: see launch/restart.sh), up to K times. Each restart
# reads HOSTFILE again, so a host you remove from it while the job waits to
# restart is not used again (dropping a dead host by itself is not done).
#
# At 3, 5, 6 or 7 ranks under MPICH, MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=ring and
# MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM=tsp_ring unless set (launch/common.sh,
# dpcnn_mpich_ring_allreduce): MPICH's own choice there puts twice the gradient
# on some links.
#
# PYTHON, MPIRUN: which interpreter and mpirun (see launch/common.sh);
# MPIRUN_ARGS: extra launcher flags.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
. "$(dirname "${BASH_SOURCE[0]}")/restart.sh"

case "${1:-}" in
    -h | --help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
dpcnn_parse_restarts "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
export DPCNN_RESTARTS="${DPCNN_RESTARTS:-0}"  # the attempt number, set anew by each restart
(( $# >= 2 )) || dpcnn_die "usage: $0 [--max-restarts K] HOSTFILE N [hydra overrides...]  (see $0 --help)"
hostfile="$1"
np="$2"
shift 2
[[ -r "$hostfile" ]] || dpcnn_die "hostfile $hostfile not found"
if ! [[ "$np" =~ ^[0-9]+$ ]] || (( np < 1 )); then
    dpcnn_die "N must be a positive number of ranks, got '$np'"
fi

dpcnn_setup
dpcnn_iface_flags
dpcnn_mpich_ring_allreduce "$np"
if [[ "$MPI_FLAVOUR" == openmpi ]]; then
    # Open MPI: hostfile lines are "host slots=K"; variables are exported with -x.
    flags=(--hostfile "$hostfile" -x PYTHONPATH -x PATH)
    for var in VIRTUAL_ENV MLFLOW_TRACKING_URI $(compgen -e | grep -E '^(DPCNN|UCX|FI)_' || true); do
        [[ -n "${!var:-}" ]] && flags+=(-x "$var")
    done
    [[ "$(id -u)" == 0 ]] && flags+=(--allow-run-as-root)
else
    flags=(-f "$hostfile" -launcher "${LAUNCHER:-ssh}")
fi
dpcnn_supervise "$MPIRUN" ${flags[@]+"${flags[@]}"} -n "$np" ${IFACE_FLAGS[@]+"${IFACE_FLAGS[@]}"} \
    ${BLAS_ENV_FLAGS[@]+"${BLAS_ENV_FLAGS[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$PYTHON" -m dpcnn.train -- "$@"
