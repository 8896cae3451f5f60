#!/usr/bin/env bash
# Train over several machines with MPICH's mpirun (the `mpich` wheel's hydra):
#
#   launch/multihost.sh HOSTFILE N [hydra overrides...]
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
# PYTHON, MPIRUN: which interpreter and mpirun (see launch/common.sh);
# MPIRUN_ARGS: extra launcher flags, e.g. "-iface eth0" to choose the network.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
    -h | --help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
(( $# >= 2 )) || dpcnn_die "usage: $0 HOSTFILE N [hydra overrides...]  (see $0 --help)"
hostfile="$1"
np="$2"
shift 2
[[ -r "$hostfile" ]] || dpcnn_die "hostfile $hostfile not found"
if ! [[ "$np" =~ ^[0-9]+$ ]] || (( np < 1 )); then
    dpcnn_die "N must be a positive number of ranks, got '$np'"
fi

dpcnn_setup
if [[ "$MPI_FLAVOUR" == openmpi ]]; then
    # Open MPI: hostfile lines are "host slots=K"; variables are exported with -x.
    flags=(--hostfile "$hostfile" -x PYTHONPATH -x PATH)
    for var in DPCNN_DATA_DIR MLFLOW_TRACKING_URI VIRTUAL_ENV; do
        [[ -n "${!var:-}" ]] && flags+=(-x "$var")
    done
    [[ "$(id -u)" == 0 ]] && flags+=(--allow-run-as-root)
else
    flags=(-f "$hostfile" -launcher "${LAUNCHER:-ssh}")
fi
dpcnn_exec "$MPIRUN" ${flags[@]+"${flags[@]}"} -n "$np" ${BLAS_ENV_FLAGS[@]+"${BLAS_ENV_FLAGS[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$PYTHON" -m dpcnn.train "$@"
