# shellcheck shell=bash
# Sourced by the launch scripts: finds the repository, the Python and the
# mpirun to use, and pins BLAS to one thread per rank. Not meant to be run.
#
#   PYTHON   interpreter that has dpcnn's dependencies. Default: the active
#            virtualenv's ($VIRTUAL_ENV/bin/python), else <repo>/.venv/bin/python,
#            else python3 on PATH.
#   MPIRUN   the MPI launcher. Default: the mpirun next to $PYTHON (the `mpich`
#            wheel installs it into the virtualenv), else mpirun on PATH.
#   BLAS_THREADS  threads per rank for OpenBLAS/MKL/OpenMP (default 1: the
#            ranks already use every core; more threads per rank fight them).
#   MPIRUN_ARGS   extra launcher flags (split on spaces).
#   DPCNN_QUIET   set: do not print the command before running it.

# The checkout this file is in (not $DPCNN_REPO: a script runs its own checkout).
DPCNN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dpcnn_die() { echo "dpcnn launch: $*" >&2; exit 2; }

dpcnn_find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        command -v -- "$PYTHON" >/dev/null || dpcnn_die "PYTHON=$PYTHON is not an executable"
        PYTHON="$(command -v -- "$PYTHON")"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$DPCNN_REPO/.venv/bin/python" ]]; then
        PYTHON="$DPCNN_REPO/.venv/bin/python"
    elif command -v python3 >/dev/null; then
        PYTHON="$(command -v python3)"
    else
        dpcnn_die "no Python found: activate a virtualenv, run 'make install', or set PYTHON=/path/to/python"
    fi
}

dpcnn_find_mpirun() {
    # Next to the interpreter first (not through symlinks: a venv's bin/python links
    # to the base interpreter, but the venv's bin/ is where pip put mpirun).
    local bindir
    bindir="$(dirname -- "$PYTHON")"
    if [[ -n "${MPIRUN:-}" ]]; then
        command -v -- "$MPIRUN" >/dev/null || dpcnn_die "MPIRUN=$MPIRUN is not an executable"
        MPIRUN="$(command -v -- "$MPIRUN")"
    elif [[ -x "$bindir/mpirun" ]]; then
        MPIRUN="$bindir/mpirun"
    elif command -v mpirun >/dev/null; then
        MPIRUN="$(command -v mpirun)"
    else
        dpcnn_die "no mpirun found next to $PYTHON or on PATH: 'pip install mpich' into that environment, or set MPIRUN=/path/to/mpirun"
    fi
}

# mpich | openmpi | other: the flags for a hostfile and for environment variables differ.
dpcnn_mpi_flavour() {
    local v
    v="$("$MPIRUN" --version 2>&1 || true)"
    case "$v" in
        *"Open MPI"* | *OpenRTE* | *"Open RTE"* | *PRRTE*) echo openmpi ;;
        *HYDRA* | *MPICH* | *"Intel(R) MPI"*) echo mpich ;;
        *) echo other ;;
    esac
}

dpcnn_setup() {
    dpcnn_find_python
    dpcnn_find_mpirun
    local n="${BLAS_THREADS:-1}"
    export OMP_NUM_THREADS="$n" OPENBLAS_NUM_THREADS="$n" MKL_NUM_THREADS="$n"
    # Run this checkout's dpcnn (and its conf/) even where it is not pip-installed.
    export PYTHONPATH="$DPCNN_REPO${PYTHONPATH:+:$PYTHONPATH}"
    MPI_FLAVOUR="$(dpcnn_mpi_flavour)"
    # shellcheck disable=SC2034  # EXTRA_ARGS: MPIRUN_ARGS as words, for the scripts that source this
    read -ra EXTRA_ARGS <<< "${MPIRUN_ARGS:-}"
    # Flags that put the BLAS pin into every rank's environment explicitly, so a
    # remote host's shell profile cannot undo it.
    BLAS_ENV_FLAGS=()
    local var
    for var in OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS; do
        if [[ "$MPI_FLAVOUR" == openmpi ]]; then
            BLAS_ENV_FLAGS+=(-x "$var")
        else
            BLAS_ENV_FLAGS+=(-genv "$var" "$n")
        fi
    done
}

# Launcher flags for N ranks on this host, in LOCAL_FLAGS: Open MPI wants
# --oversubscribe beyond the cores and --allow-run-as-root as root; MPICH neither.
dpcnn_local_flags() {
    LOCAL_FLAGS=()
    if [[ "$MPI_FLAVOUR" == openmpi ]]; then
        if (( $1 > $(dpcnn_cores) )); then LOCAL_FLAGS+=(--oversubscribe); fi
        if [[ "$(id -u)" == 0 ]]; then LOCAL_FLAGS+=(--allow-run-as-root); fi
    fi
}

# IFACE=eth0: train over that network interface. Flags for it in IFACE_FLAGS (hydra's control
# connections: -iface; Open MPI's: --mca ..._if_include), and MPI's data path follows it unless set
# already: UCX_NET_DEVICES (MPICH's default UCX netmod, Open MPI's UCX pml) and FI_TCP_IFACE (OFI tcp).
dpcnn_iface_flags() {
    IFACE_FLAGS=()
    [[ -n "${IFACE:-}" ]] || return 0
    export UCX_NET_DEVICES="${UCX_NET_DEVICES:-$IFACE}" FI_TCP_IFACE="${FI_TCP_IFACE:-$IFACE}"
    if [[ "$MPI_FLAVOUR" == openmpi ]]; then
        IFACE_FLAGS=(--mca oob_tcp_if_include "$IFACE" --mca btl_tcp_if_include "$IFACE")
    else
        IFACE_FLAGS=(-iface "$IFACE")
    fi
}

# MPICH's sum in a ring at N = 3, 5, 6 or 7 ranks (unless set): its default Allreduce for a rank count
# that is not a power of two folds the extra ranks into partners first, and their links carry twice
# the gradient; a ring puts 2 (N - 1) / N of it on every link (3 emulated hosts at 1 Gbit/s: 2.01x
# the step buffer on one link against 1.34x on each, training 1.3-1.5x faster; bench/RESULTS.md). From 8
# ranks on MPICH's choice stays: the ring takes 2 (N - 1) rounds for every small sum too. Measured at
# 3 ranks on 3 hosts only; 5, 6 and 7 fold the same way. Exported:
# hydra (-genvall), srun and mpirun under Slurm pass it to the ranks. Open MPI: nothing.
dpcnn_mpich_ring_allreduce() {
    local n="$1"
    [[ "$MPI_FLAVOUR" != openmpi ]] && (( n >= 3 && n < 8 && (n & (n - 1)) != 0 )) || return 0
    export MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM="${MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM:-ring}"
    export MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM="${MPIR_CVAR_IALLREDUCE_INTRA_ALGORITHM:-tsp_ring}"
}

# Cores this process may run on. (GNU nproc would answer $OMP_NUM_THREADS if set,
# and that is often 1 exactly where this is called.)
dpcnn_cores() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

# Print the command, then run it in place of the script (exit code and signals
# then reach mpirun directly: SIGTERM to this script = SIGTERM to mpirun, which
# forwards it to every rank; dpcnn checkpoints and exits 143).
dpcnn_exec() {
    if [[ -z "${DPCNN_QUIET:-}" ]]; then
        printf '+' >&2
        printf ' %q' "$@" >&2
        printf '\n' >&2
    fi
    exec "$@"
}
