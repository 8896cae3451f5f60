#!/usr/bin/env bash
# Run a hyperparameter sweep (a Hydra multirun) on N ranks, here or under Slurm,
# and print the best trial at the end as a ready-to-run command:
#
#   launch/sweep.sh [-n N] [hydra overrides...]                 # here, N ranks (default: one per core)
#   launch/sweep.sh -n 2 model=tiny optimizer.lr=0.01,0.03,0.1   # a grid: every value listed
#   launch/sweep.sh -n 2 hparams_search=optuna hydra.sweeper.n_trials=50
#   launch/sweep.sh --slurm [sbatch options...] -- [hydra overrides...]
#   launch/sweep.sh --slurm --ntasks=8 --time=04:00:00 -- hparams_search=optuna
#
# Every rank runs every trial together (each trial is a data-parallel training
# job); rank 0 picks the trials. Results: multirun/<date>/<time>/ (trials.csv,
# sweep_summary.png, best_config.yaml, best_command.txt; one subdirectory per
# trial) and MLflow (one parent run per sweep, a nested child per trial).
# Running the same command again resumes the sweep: trials already recorded
# in MLflow are not trained again (hydra.callbacks.sweep.resume=false to redo).
#
# --slurm submits this script with sbatch (options before `--` go to sbatch;
# default --ntasks is N if -n is given, else 2) and the job runs the sweep with
# the mpirun of the virtualenv, one rank per task; its log
# (slurm-dpcnn-sweep-<job id>.out) ends with the best command. Submit from the
# checkout; the data, multirun/ and the MLflow store must be on a filesystem
# every node sees. If the job runs out of time, submit it again: it resumes.
# PYTHON, MPIRUN, BLAS_THREADS: see launch/common.sh.
set -euo pipefail
. "${DPCNN_REPO:-$(dirname "${BASH_SOURCE[0]}")/..}/launch/common.sh"

usage() { sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

np="" slurm=0 in_slurm=0 sbatch_opts=()
while (( $# )); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -n) [[ "${2:-}" =~ ^[0-9]+$ ]] || dpcnn_die "-n needs a number of ranks"; np="$2"; shift 2 ;;
        --slurm)
            slurm=1; shift
            while (( $# )) && [[ "$1" != -- ]]; do sbatch_opts+=("$1"); shift; done
            (( $# )) && shift  # the --
            break ;;
        --in-slurm) in_slurm=1; shift ;;
        *) break ;;
    esac
done

if (( slurm )); then
    command -v sbatch >/dev/null || dpcnn_die "sbatch not found: run on a Slurm login node, or drop --slurm"
    defaults=(--job-name=dpcnn-sweep --output=slurm-%x-%j.out)
    ntasks=0
    for opt in "${sbatch_opts[@]}"; do
        [[ "$opt" == --ntasks* || "$opt" == -n* ]] && ntasks=1
    done
    (( ntasks )) || defaults+=(--ntasks="${np:-2}")
    # Slurm runs a copy of the script: DPCNN_REPO (exported) tells it where the checkout is.
    export DPCNN_REPO
    cmd=(sbatch "${defaults[@]}" "${sbatch_opts[@]}" "$DPCNN_REPO/launch/sweep.sh" --in-slurm "$@")
    printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; printf '\n' >&2
    exec "${cmd[@]}"
fi

if (( in_slurm )); then
    np="${SLURM_NTASKS:?--in-slurm is for the batch job that --slurm submits}"
    cd "${SLURM_SUBMIT_DIR:-$PWD}"
fi
np="${np:-$(dpcnn_cores)}"
(( np >= 1 )) || dpcnn_die "the number of ranks must be >= 1, got $np"
dpcnn_setup

# Rank 0 would pick the time stamp of the sweep directory anyway; picking it here
# tells this script where the results will be.
export DPCNN_RUN_STAMP="${DPCNN_RUN_STAMP:-$(date +%Y-%m-%d/%H-%M-%S)}"
sweep_dir="multirun/$DPCNN_RUN_STAMP"
for arg in "$@"; do
    [[ "$arg" == hydra.sweep.dir=* ]] && sweep_dir="${arg#hydra.sweep.dir=}"
done

dpcnn_local_flags "$np"
cmd=("$MPIRUN" -n "$np" "${LOCAL_FLAGS[@]}" "${BLAS_ENV_FLAGS[@]}" "${EXTRA_ARGS[@]}" "$PYTHON" -m dpcnn.train -m "$@")
printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; printf '\n' >&2
rc=0
"${cmd[@]}" || rc=$?

echo
if [[ -s "$sweep_dir/best_command.txt" ]]; then
    echo "dpcnn sweep: results in $sweep_dir (trials.csv, sweep_summary.png, best_config.yaml)"
    echo "dpcnn sweep: best trial, as a command:"
    echo
    echo "    $(cat "$sweep_dir/best_command.txt")"
    echo
else
    echo "dpcnn sweep: no successful trial (exit code $rc); see the log above and $sweep_dir"
    (( rc )) || rc=1
fi
exit "$rc"
