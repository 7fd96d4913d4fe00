#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the Slurm test and for trying the slurm profile.
#
#   workflow/scripts/local_slurm.sh start    install (apt, as root) if needed, configure, start; idempotent
#   workflow/scripts/local_slurm.sh stop     stop the daemons this script started, by their PID files
#   workflow/scripts/local_slurm.sh status   sinfo of the running cluster
#
# Debian's slurm-wlm (22.05) and munge. slurmctld and slurmd run as root with state, logs and PID
# files under $VISIONQC_SLURM_STATE (default /tmp/visionqc-slurm). Slurm reads its config only from
# /etc/slurm/slurm.conf (srun inside a job ignores SLURM_CONF), so the script writes it there and
# refuses to overwrite a slurm.conf it did not write. Two partitions share the node: cpu (default)
# and gpu. The node declares two GPUs whose device files are /dev/null-like stand-ins in $STATE/dev:
# sbatch accepts --gpus requests, Slurm schedules and records them and sets CUDA_VISIBLE_DEVICES,
# but no real device is bound (jobs here still compute on the CPU).
set -euo pipefail

STATE=${VISIONQC_SLURM_STATE:-/tmp/visionqc-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by visionqc local_slurm.sh"
NODE=$(hostname -s)

die() { echo "local_slurm: $*" >&2; exit 1; }

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are missing; install them as root: apt-get install -y slurm-wlm munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

configure() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" $CONF; then
        die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    mkdir -p "$STATE"/{ctld,spool,munge,dev} /etc/slurm
    local node
    node=$(slurmd -C | head -1)   # NodeName=… CPUs=… RealMemory=… as this machine reports it
    cat > "$CONF.tmp" <<EOF
$MARK; state in $STATE
ClusterName=visionqc
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MinJobAge=3600
ReturnToService=2
GresTypes=gpu
$node Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" $CONF
    echo "$MARK" > /etc/slurm/gres.conf
    for i in 0 1; do   # stand-ins for /dev/nvidia*: character devices like /dev/null
        [[ -c $STATE/dev/gpu$i ]] || { rm -f "$STATE/dev/gpu$i"; mknod "$STATE/dev/gpu$i" c 1 3; }
    done
    echo "NodeName=$NODE Name=gpu File=$STATE/dev/gpu[0-1]" >> /etc/slurm/gres.conf
}

start() {
    install
    configure
    if ! running "$STATE/munged.pid"; then
        [[ -f /etc/munge/munge.key ]] || mungekey --create
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge "$STATE/munge" /etc/munge/munge.key
        runuser -u munge -- munged --pid-file "$STATE/munge/munged.pid" --log-file "$STATE/munge/munged.log"
        ln -sf munge/munged.pid "$STATE/munged.pid"
    fi
    running "$STATE/slurmctld.pid" || slurmctld -c   # -c: no jobs or node states from an earlier start
    running "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 60); do
        sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -qE "^(idle|mix|alloc)" && { status; return; }
        sleep 1
    done
    die "node $NODE did not become idle in 60 s; see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop() {
    for daemon in slurmd slurmctld munged; do
        local pidfile=$STATE/$daemon.pid
        if running "$pidfile"; then
            local pid
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            echo "stopped $daemon ($pid)"
        fi
    done
}

status() {
    sinfo -N -o "%N %P %t %c %m %G"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
