#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing
# launch/slurm.sbatch (Debian/Ubuntu, as root):
#
#   apt-get install -y slurm-wlm        # slurmctld, slurmd, munge, sbatch...
#   launch/slurm-localhost.sh           # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#   launch/slurm-localhost.sh stop      # stop the daemons this script started
#
# The node is this host under its real short hostname, with all its CPUs in
# the partition `debug`, whose jobs may be requeued and are pre-empted by jobs
# in the partition `urgent`. No accounting database, no
# cgroups (proctrack/linuxproc): enough for sbatch/srun/scancel/scontrol, not
# a production setup. Re-running it restarts the daemons with a fresh config.
set -euo pipefail

conf_dir=/etc/slurm
state=/var/spool/slurmctld
spool=/var/spool/slurmd
run=/run/dpcnn-slurm
host="$(hostname -s)"
cpus="${SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"

die() { echo "slurm-localhost: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || die "must run as root (it writes $conf_dir and starts daemons)"
for exe in munged slurmctld slurmd sinfo; do
    command -v "$exe" >/dev/null || die "$exe not found: apt-get install -y slurm-wlm"
done

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -r "$run/$name.pid" ]] || continue
        pid="$(cat "$run/$name.pid")"
        # Only that daemon: after a reboot the pid may belong to something else.
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$run/$name.pid"
    done
}

if [[ "${1:-}" == stop ]]; then
    stop
    exit 0
fi

if [[ -e "$conf_dir/slurm.conf" ]] && ! grep -q "^# Written by dpcnn" "$conf_dir/slurm.conf" && [[ -z "${FORCE:-}" ]]; then
    die "$conf_dir/slurm.conf exists and is not ours: this is for machines without Slurm (FORCE=1 overwrites it)"
fi
stop
mkdir -p "$conf_dir" "$state" "$spool" "$run" /var/log/slurm /run/munge
chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge, or run mungekey --create)"

cat > "$conf_dir/slurm.conf" <<CONF
# Written by dpcnn's launch/slurm-localhost.sh: a one-node test cluster.
ClusterName=dpcnn-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after its old credential expires
# (default 120 s); short here so that tests of requeueing do not wait long.
AuthInfo=cred_expire=${CRED_EXPIRE:-10}
StateSaveLocation=$state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look for startable jobs often (a requeued job waits for the next pass).
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
# Jobs in \`urgent\` pre-empt those in \`debug\`: these get SIGTERM, 30 s of grace,
# then are cancelled (a job that requeues itself comes back).
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
CONF

# Started directly (no systemd in containers); each writes its pid file.
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "slurm-localhost: munged already running"
else
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$run/munged.pid"
fi
slurmctld -i
slurmd
for _ in $(seq 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        sinfo
        exit 0
    fi
    sleep 0.2
done
sinfo || true
die "the node did not become idle in 20 s; see /var/log/slurm/slurmctld.log and slurmd.log"
