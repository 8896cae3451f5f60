#!/usr/bin/env bash
# A cluster of N hosts on this one machine (Linux, as root), to see
# multi-host training, what the network costs and how failures look without
# owning a cluster:
#
#   launch/emulated-cluster.sh up N [--rate 1gbit|10gbit|none] [--slots K] [--mlflow [--mlflow-store DIR]]
#   launch/emulated-cluster.sh run NP [hydra overrides...]   # launch/multihost.sh on these hosts
#   launch/emulated-cluster.sh stats                         # bytes each host's link moved
#   launch/emulated-cluster.sh exec K CMD...                 # a command on host K (e.g. ip link set eth0 down)
#   launch/emulated-cluster.sh mpirun NP CMD...              # any MPI (or other) program on the hosts
#   launch/emulated-cluster.sh rate 1gbit|10gbit|none        # reshape every link
#   launch/emulated-cluster.sh down                          # remove everything `up` made
#   launch/emulated-cluster.sh check                         # can this machine do it? (exit 0/1 + reason)
#
# --name NAME (or DPCNN_CLUSTER=NAME; default dpcnn, letters/digits/_ only)
# before the command picks the cluster, so several can exist at once.
#
# Each host nodeK is a network namespace NAME-nodeK with an interface eth0,
# address 198.18.0.K/24 (the range reserved for benchmarking), no default
# route, and a veth pair into a bridge that lives in a namespace of its own
# (NAME-switch). Nothing is added to this machine's own network: no
# interface, address or route outside those namespaces. Programs on a host
# run under `ip netns exec` (which also gives them /etc/hosts naming
# node1..nodeN) in a UTS namespace with hostname nodeK. --rate shapes every
# link in both directions with a token bucket (tc tbf; bandwidth only, no
# added latency); the default is unshaped (veth speed, several Gbit/s).
#
# `run` starts launch/multihost.sh on node1, unchanged, with the hostfile
# (nodeK:SLOTS lines, SLOTS=--slots, default 1) and:
#   IFACE=eth0            the network to use, as on a real cluster with
#                         several (multihost.sh: hydra's -iface, UCX_NET_DEVICES)
#   UCX_TLS=tcp,self      only because these hosts share a kernel: MPICH's UCX
#                         netmod would use shared memory between them, "hosts"
#                         or not; this makes it use TCP, as between machines
#   MPIRUN_ARGS="-launcher-exec <state dir>/ssh"   an "ssh" that starts
#                         hydra's proxy in the host's namespace with a fresh
#                         environment, as sshd would (no sshd needed)
# and, when the hosts outnumber this machine's cores, DPCNN_MPI_WAIT=yield
# (each emulated host believes it has all the cores). Any of these set in the
# environment wins. With --mlflow, `up` starts an `mlflow server` on node1
# at http://node1:5000 (store in the state dir unless --mlflow-store DIR;
# `down` deletes the state dir) and `run` logs to it.
#
# State: /run/dpcnn-cluster/NAME (DPCNN_CLUSTER_STATE=dir moves it). `down`
# works from the namespace names alone, so it also cleans up after a crash.
# PYTHON, MPIRUN, MPIRUN_ARGS, BLAS_THREADS: see launch/common.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SELF="$DPCNN_REPO/launch/emulated-cluster.sh"
SUBNET=198.18.0
MLFLOW_PORT=5000

usage() { sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "emulated-cluster: $*" >&2; exit 2; }

name="${DPCNN_CLUSTER:-dpcnn}"
if [[ "${1:-}" == --name ]]; then
    (( $# >= 2 )) || die "--name needs a value"
    name="$2"
    shift 2
fi
[[ "$name" =~ ^[A-Za-z0-9_]{1,24}$ ]] || die "cluster name must be 1-24 letters, digits or _, got '$name'"
state="${DPCNN_CLUSTER_STATE:-/run/dpcnn-cluster}/$name"
switch_ns="$name-switch"
host_ns() { echo "$name-node$1"; }

nodes() { cat "$state/nodes" 2>/dev/null || die "cluster '$name' is not up (no $state): run 'up N' first"; }

# Every namespace of this cluster, from `ip netns list` (not from the state dir, which a crash may have lost).
cluster_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${name}-(switch|node[0-9]+)\$" || true
}

# Run "$@" on host K: its network namespace, a UTS namespace of its own with hostname nodeK.
in_host() {
    local k="$1"
    shift
    exec ip netns exec "$(host_ns "$k")" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "node$k" "$@"
}

rate_bits() {  # 1gbit -> 1000000000; none -> 0
    local r="${1,,}"
    case "$r" in
        none | 0) echo 0 ;;
        *[0-9]kbit) echo $(( ${r%kbit} * 1000 )) ;;
        *[0-9]mbit) echo $(( ${r%mbit} * 1000000 )) ;;
        *[0-9]gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
        *) die "rate must look like 100mbit, 1gbit, 10gbit or none, got '$1'" ;;
    esac
}

# Shape one interface's egress (inside namespace $1) to $2 bits/s; 0 removes the shaping.
shape() {
    local ns="$1" dev="$2" bits="$3"
    ip -n "$ns" link set "$dev" up
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    (( bits > 0 )) || return 0
    # Bucket: 0.5 ms at the rate, at least 96 KiB. A message sent after idle crosses the bucket's
    # bytes at veth speed, so that is what it gets ahead of a real link of the rate: with the 2 ms of
    # before, `small`'s 848 KB step buffer crossed 1 Gbit/s at 1.27 Gbit/s (now 1 MB after idle
    # crosses at 1.03). The floor is one GSO packet (64 KiB of payload, plus each frame's headers):
    # tbf cuts a packet larger than its bucket into 1.5 KB frames, which the bridge and both TCP
    # stacks then handle one by one, in softirq, on the cores that train. With a 64 KiB bucket a
    # 1 Gbit/s link cost 12x the CPU (299 against 24 softirq ticks for 485 MB) and no transfer could
    # overlap compute. Above 5 Gbit/s 2 ms: with less, tbf's timer does not reach the rate on a 2-core
    # VM (10 Gbit/s: 7.2-7.5 Gbit/s at 0.5 ms, 8.4-8.8 at 2 ms; the veth's own ~10-12). Queue: 20 ms.
    local burst=$(( bits / 8 / 2000 ))
    (( bits <= 5000000000 )) || burst=$(( bits / 8 / 500 ))
    (( burst >= 98304 )) || burst=98304
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$bits" burst "$burst" latency 20ms
}

set_rate() {
    local bits k n
    bits="$(rate_bits "$1")"
    n="$(nodes)"
    for k in $(seq "$n"); do
        shape "$(host_ns "$k")" eth0 "$bits"   # host -> switch
        shape "$switch_ns" "node$k" "$bits"    # switch -> host
    done
    echo "$1" > "$state/rate"
}

check() {
    [[ "$(id -u)" == 0 ]] || { echo "needs root (network namespaces)"; return 1; }
    local tool
    for tool in ip tc unshare hostname; do
        command -v "$tool" >/dev/null || { echo "$tool not found"; return 1; }
    done
    local probe="$name-probe$$"
    ip netns add "$probe" 2>/dev/null || { echo "'ip netns add' does not work here"; return 1; }
    local ok=0
    ip -n "$probe" link add eth0 type veth peer name peer0 2>/dev/null || ok=1
    ip netns exec "$probe" unshare --uts -- hostname probe 2>/dev/null || ok=2
    ip netns del "$probe"
    case "$ok" in
        1) echo "no veth support"; return 1 ;;
        2) echo "'unshare --uts' does not work here"; return 1 ;;
    esac
}

# IPv4 only: no IPv6 router solicitations or neighbour discovery in the link counters.
no_ipv6() {
    ip netns exec "$1" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
}

up() {
    local n="" rate=none slots=1 mlflow=0 store=""
    while (( $# )); do
        case "$1" in
            --rate) rate="${2:?--rate needs a value}"; shift 2 ;;
            --slots) slots="${2:?--slots needs a value}"; shift 2 ;;
            --mlflow) mlflow=1; shift ;;
            --mlflow-store) store="${2:?--mlflow-store needs a directory}"; shift 2 ;;
            *) [[ -z "$n" ]] || die "unexpected argument '$1'"; n="$1"; shift ;;
        esac
    done
    [[ "$n" =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 250 )) || die "up N: N must be 1..250 hosts, got '${n}'"
    [[ "$slots" =~ ^[0-9]+$ ]] && (( slots >= 1 )) || die "--slots must be a positive number, got '$slots'"
    rate_bits "$rate" >/dev/null
    local why
    why="$(check)" || die "cannot build a cluster here: $why"
    if [[ -e "$state" || -n "$(cluster_namespaces)" ]]; then
        die "cluster '$name' exists already: '$0 --name $name down' first, or pick another --name"
    fi
    [[ "$state" != *[[:space:]]* ]] || die "the state directory must not contain spaces: $state"
    # Whatever fails from here on (a command, a die), nothing half-made stays behind.
    trap 'rc=$?; if (( rc )); then echo "emulated-cluster: up failed; removing what was made" >&2; down >/dev/null 2>&1 || true; fi' EXIT
    mkdir -p "$state"
    echo "$n" > "$state/nodes"
    local k
    {
        echo "# cluster $name (written by launch/emulated-cluster.sh)"
        echo "127.0.0.1 localhost"
        for k in $(seq "$n"); do echo "$SUBNET.$k node$k"; done
    } > "$state/etc-hosts"
    for k in $(seq "$n"); do echo "node$k:$slots"; done > "$state/hostfile"
    printf '#!/bin/sh\n# ssh to a host of cluster %s\nexec %q --name %q ssh "$@"\n' "$name" "$SELF" "$name" > "$state/ssh"
    chmod +x "$state/ssh"

    ip netns add "$switch_ns"
    no_ipv6 "$switch_ns"
    ip -n "$switch_ns" link set lo up
    ip -n "$switch_ns" link add br0 type bridge
    ip -n "$switch_ns" link set br0 up
    for k in $(seq "$n"); do
        local ns
        ns="$(host_ns "$k")"
        ip netns add "$ns"
        mkdir -p "/etc/netns/$ns"
        cp "$state/etc-hosts" "/etc/netns/$ns/hosts"
        no_ipv6 "$ns"
        ip -n "$ns" link set lo up
        # Both ends are created inside namespaces: the host's eth0, its peer nodeK on the switch.
        ip -n "$ns" link add eth0 type veth peer name "node$k" netns "$switch_ns"
        ip -n "$switch_ns" link set "node$k" master br0 up
        ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    set_rate "$rate"
    if (( mlflow )); then
        start_mlflow "${store:-$state/mlflow}"
    fi
    trap - EXIT
    echo "cluster $name: $n host(s) node1..node$n ($SUBNET.1-$n), links: $rate, hostfile $state/hostfile"
    [[ ! -f "$state/mlflow.url" ]] || echo "mlflow server: $(cat "$state/mlflow.url") (store $(cat "$state/mlflow.store"))"
}

start_mlflow() {
    local store
    store="$(mkdir -p "$1" && cd "$1" && pwd)"
    dpcnn_find_python
    # Detached from this shell; `down` ends it with the other processes of the namespace. No job
    # runner (MLflow's background workers for GenAI jobs: eight processes a run does not need).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" setsid ip netns exec "$(host_ns 1)" unshare --uts -- sh -c 'hostname node1 && exec "$@"' mlflow \
        "$PYTHON" -m mlflow server --host "$SUBNET.1" --port "$MLFLOW_PORT" --workers 1 --allowed-hosts "node1,node1:$MLFLOW_PORT,$SUBNET.1,$SUBNET.1:$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$store/mlflow.db" --artifacts-destination "$store/artifacts" \
        > "$state/mlflow.log" 2>&1 < /dev/null &
    local server=$! url="http://node1:$MLFLOW_PORT" i
    for i in $(seq 240); do
        if ! kill -0 "$server" 2>/dev/null; then
            tail -20 "$state/mlflow.log" >&2
            die "the mlflow server on node1 exited (log: $state/mlflow.log)"
        fi
        # Listening on node1's address (bash's /dev/tcp: no interpreter started per probe).
        if ip netns exec "$(host_ns 1)" bash -c "exec 3<>/dev/tcp/$SUBNET.1/$MLFLOW_PORT" 2>/dev/null; then
            echo "$url" > "$state/mlflow.url"
            echo "$store" > "$state/mlflow.store"
            return 0
        fi
        sleep 0.5
    done
    tail -20 "$state/mlflow.log" >&2
    die "the mlflow server on node1 did not answer within 120 s (log: $state/mlflow.log)"
}

# Stop every process inside the cluster's namespaces: TERM, then KILL after 5 s.
kill_all() {
    local ns pids=() i
    for ns in "$@"; do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
    done
    (( ${#pids[@]} )) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.1
    done
}

down() {
    local namespaces ns
    mapfile -t namespaces < <(cluster_namespaces)
    kill_all ${namespaces[@]+"${namespaces[@]}"}
    for ns in ${namespaces[@]+"${namespaces[@]}"}; do
        ip netns del "$ns"          # its veth end goes with it, and with it the peer
        rm -rf "/etc/netns/${ns:?}"
    done
    rm -rf "${state:?}"
    rmdir /etc/netns "$(dirname "$state")" 2>/dev/null || true  # when no other cluster uses them
    echo "cluster $name: down (${#namespaces[@]} namespace(s) removed)"
}

# The environment a run on this cluster needs; anything already set wins.
cluster_env() {
    local np="$1"
    export UCX_TLS="${UCX_TLS:-tcp,self}" IFACE="${IFACE:-eth0}"
    if [[ -z "${DPCNN_MPI_WAIT:-}" ]] && (( np > $(dpcnn_cores) )); then
        export DPCNN_MPI_WAIT=yield
    fi
    if [[ -z "${MLFLOW_TRACKING_URI:-}" && -f "$state/mlflow.url" ]]; then
        MLFLOW_TRACKING_URI="$(cat "$state/mlflow.url")"
        export MLFLOW_TRACKING_URI
    fi
    LAUNCH_FLAGS=(-launcher-exec "$state/ssh")
}

# hydra's `ssh -x HOST COMMAND...`: like sshd, run COMMAND (the words joined, by a shell) on
# HOST in a fresh login environment, so only what mpirun passes on reaches the ranks.
ssh_to() {
    while [[ "${1:-}" == -* ]]; do
        case "$1" in
            -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
            *) shift ;;
        esac
    done
    local host="${1:?ssh: no host}" k
    shift
    case "$host" in
        node[0-9]*) k="${host#node}" ;;
        "$SUBNET".[0-9]*) k="${host#"$SUBNET".}" ;;
        *) k="" ;;
    esac
    if [[ ! "$k" =~ ^[0-9]+$ ]] || (( k < 1 || k > $(nodes) )); then
        echo "ssh: Could not resolve hostname $host: Name or service not known" >&2
        exit 255
    fi
    local home="${HOME:-/root}"
    exec ip netns exec "$(host_ns "$k")" unshare --uts -- env -i HOME="$home" USER="$(id -un)" LOGNAME="$(id -un)" \
        SHELL=/bin/sh PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c 'hostname "$0" && cd && exec sh -c "$1"' "node$k" "$*"
}

stats() {
    local n k ns
    n="$(nodes)"
    echo "host rx_bytes tx_bytes"
    for k in $(seq "$n"); do
        ns="$(host_ns "$k")"
        echo "node$k $(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/rx_bytes) $(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/tx_bytes)"
    done
}

positive() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 )) || die "$2 must be a positive number, got '$1'"; }

cmd="${1:-}"
(( $# )) && shift
case "$cmd" in
    -h | --help | help | "") usage ;;
    check) check ;;
    up) up "$@" ;;
    down) down ;;
    rate) (( $# == 1 )) || die "usage: rate 1gbit|10gbit|none"; nodes >/dev/null; set_rate "$1"; echo "links: $1" ;;
    stats) stats ;;
    ssh) ssh_to "$@" ;;
    exec)
        (( $# >= 2 )) || die "usage: exec K CMD..."
        positive "$1" "K"
        (( $1 <= $(nodes) )) || die "no host node$1 (the cluster has $(nodes))"
        in_host "$@" ;;
    run | mpirun)
        if [[ "$cmd" == run ]]; then min=1 usage_line="run NP [hydra overrides...]"; else min=2 usage_line="mpirun NP CMD..."; fi
        (( $# >= min )) || die "usage: $usage_line"
        positive "$1" NP
        nodes >/dev/null
        np="$1"
        shift
        cluster_env "$np"
        if [[ "$cmd" == run ]]; then
            MPIRUN_ARGS="${LAUNCH_FLAGS[*]}${MPIRUN_ARGS:+ $MPIRUN_ARGS}"
            export MPIRUN_ARGS
            in_host 1 "$DPCNN_REPO/launch/multihost.sh" "$state/hostfile" "$np" "$@"
        fi
        dpcnn_setup
        dpcnn_iface_flags
        in_host 1 "$MPIRUN" -f "$state/hostfile" -launcher ssh "${LAUNCH_FLAGS[@]}" "${IFACE_FLAGS[@]}" -n "$np" \
            ${BLAS_ENV_FLAGS[@]+"${BLAS_ENV_FLAGS[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$@" ;;
    *) die "unknown command '$cmd' (see --help)" ;;
esac
