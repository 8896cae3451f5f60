# shellcheck shell=bash
# Sourced by local.sh and multihost.sh: --max-restarts K, a supervisor like
# torchrun's. Not meant to be run.
#
# A job that dies of something a restart can help (a rank killed or stuck, a
# collective timeout, a lost host: any exit but the ones below) is started again
# with trainer.resume=auto in the same run directory, up to K times, after
# 2, 4, 8, ... (at most 30) seconds. It is not restarted when it exits
#   0    finished
#   2    the configuration, the data or a checkpoint is wrong (fix it first)
#   143  stopped by SIGTERM/SIGINT (pre-empted or asked to stop; 130 likewise)
# Each restart is one line here and the tag dpcnn.restarts on the new MLflow
# run (from DPCNN_RESTARTS); the run it resumes is marked FAILED and named in
# the new run's dpcnn.resumed_from tag.

# dpcnn_parse_restarts ARGS...: sets MAX_RESTARTS and ARGS (the rest, in order).
dpcnn_parse_restarts() {
    MAX_RESTARTS=0
    ARGS=()
    while (( $# )); do
        case "$1" in
            --max-restarts) [[ "${2:-}" =~ ^[0-9]+$ ]] || dpcnn_die "--max-restarts takes a number, got '${2:-}'"
                            MAX_RESTARTS="$2"; shift 2 ;;
            --max-restarts=*) MAX_RESTARTS="${1#*=}"
                              [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || dpcnn_die "--max-restarts takes a number, got '$MAX_RESTARTS'"
                              shift ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
}

# dpcnn_supervise CMD... -- OVERRIDES...: run CMD followed by the overrides;
# with MAX_RESTARTS > 0, restart it as described above. Exits with the job's code.
dpcnn_supervise() {
    local cmd=() overrides=() arg
    while (( $# )) && [[ "$1" != -- ]]; do cmd+=("$1"); shift; done
    shift
    overrides=("$@")
    if (( MAX_RESTARTS == 0 )); then
        dpcnn_exec "${cmd[@]}" ${overrides[@]+"${overrides[@]}"}
    fi
    # Restarts resume in the same directory: pin it if the command line does not.
    local has_dir=0
    for arg in ${overrides[@]+"${overrides[@]}"}; do [[ "$arg" == hydra.run.dir=* ]] && has_dir=1; done
    (( has_dir )) || overrides+=("hydra.run.dir=outputs/$(date +%Y-%m-%d/%H-%M-%S)")
    local attempt=0 rc delay child
    trap '[[ -n "${child:-}" ]] && kill -TERM "$child" 2>/dev/null' TERM INT
    while :; do
        [[ -z "${DPCNN_QUIET:-}" ]] && { printf '+' >&2; printf ' %q' "${cmd[@]}" "${overrides[@]}" >&2; printf '\n' >&2; }
        DPCNN_RESTARTS="$attempt" "${cmd[@]}" "${overrides[@]}" &
        child=$!
        rc=0
        wait "$child" || rc=$?
        while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done  # a trapped signal ends wait early
        child=
        case "$rc" in 0 | 2 | 130 | 143) exit "$rc" ;; esac
        if (( attempt >= MAX_RESTARTS )); then
            echo "dpcnn launch: the job failed (exit $rc) and --max-restarts $MAX_RESTARTS is used up; giving up" >&2
            exit "$rc"
        fi
        attempt=$(( attempt + 1 ))
        delay=$(( 2 ** attempt )); (( delay > 30 )) && delay=30
        echo "dpcnn launch: the job failed (exit $rc); restart $attempt of $MAX_RESTARTS in ${delay} s with trainer.resume=auto" >&2
        sleep "$delay"
        local kept=()
        for arg in "${overrides[@]}"; do [[ "$arg" == trainer.resume=* ]] || kept+=("$arg"); done
        overrides=("${kept[@]}" trainer.resume=auto)
    done
}
