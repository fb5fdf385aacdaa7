#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trainyard's Slurm executor tests
# (issue 18) and for developers: Debian's `slurm-wlm` and `munge`, a minimal slurm.conf
# written here, `munged`, `slurmctld` and `slurmd` on localhost.
#
#   bash scripts/slurm-local.sh start    # install (apt, as root) if needed, start, wait until the node is idle
#   bash scripts/slurm-local.sh status   # sinfo and squeue
#   bash scripts/slurm-local.sh stop     # cancel every job, stop the daemons
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/trainyard-slurm): config, state,
# spool and logs. No accounting database: `sacct` reads the job completion file
# (JobCompType=jobcomp/filetxt) and `scontrol show job` covers running jobs. Processes are
# tracked without cgroups (proctrack/linuxproc), which containers rarely delegate.
set -euo pipefail

dir="${SLURM_LOCAL_DIR:-/tmp/trainyard-slurm}"
conf="$dir/slurm.conf"
node="$(hostname -s)"
cpus="$(nproc)"
memory_mb="$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
export SLURM_CONF="$conf"

say() { printf '>> %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$conf" <<CONF
# Written by scripts/slurm-local.sh: one node, this machine.
ClusterName=trainyard-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
DefMemPerCPU=1024
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/none
KillWait=10
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        as_root mkdir -p /etc/munge
        as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        as_root chmod 400 /etc/munge/munge.key
        as_root chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    # munged refuses to run as root; Debian's package made the `munge` user.
    if id munge >/dev/null 2>&1; then
        as_root runuser -u munge -- /usr/sbin/munged
    else
        as_root /usr/sbin/munged --force
    fi
}

start() {
    install
    write_config
    start_munge
    if ! pgrep -x slurmctld >/dev/null; then
        as_root env SLURM_CONF="$conf" /usr/sbin/slurmctld -i
    fi
    if ! pgrep -x slurmd >/dev/null; then
        as_root env SLURM_CONF="$conf" /usr/sbin/slurmd
    fi
    local deadline=$((SECONDS + 60)) state=""
    while ((SECONDS < deadline)); do
        state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
        if [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]; then
            say "slurm is up: node $node ($cpus CPUs, $memory_mb MB), partition local; SLURM_CONF=$conf"
            return
        fi
        if [[ "$state" == down* || "$state" == drain* ]]; then
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    say "the node never became idle (state: ${state:-none}); logs in $dir/log"
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    if command -v scancel >/dev/null && [[ -f "$conf" ]]; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
    fi
    as_root pkill -x slurmd 2>/dev/null || true
    as_root pkill -x slurmctld 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null && ((SECONDS < deadline)); do
        sleep 0.5
    done
}

status() {
    sinfo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
