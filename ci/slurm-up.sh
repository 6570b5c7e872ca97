#!/usr/bin/env bash
# Single-node SLURM for tests and CI (Debian 12, as root, no systemd needed).
#
#   ci/slurm-up.sh --install    install munge and slurm (apt) if missing, start nothing
#   ci/slurm-up.sh STATE_DIR    install if missing, then start munged, slurmctld and slurmd
#                               and wait until the node takes jobs
#   ci/slurm-down.sh STATE_DIR  stop them again
#
# Partitions "main" (default) and "gpu" share the one node, which offers two pretend GPUs
# (gres gpu:testgpu, "devices" /dev/null and /dev/zero) so that --gpus=testgpu:N requests
# are scheduled as on a GPU cluster; jobs see CUDA_VISIBLE_DEVICES but no GPU.
# Everything but the config lives in STATE_DIR: munge key and socket, controller state,
# spool, logs, pid files and log/jobcomp.txt (one line per finished job, kept).  The config
# must be /etc/slurm/slurm.conf (with gres.conf next to it): srun inside a job reads it
# from there; ci/slurm-down.sh removes both.  One such cluster per machine (ports 6817/6818).
set -euo pipefail

install_packages() {
    local bin missing=0
    for bin in munged slurmctld slurmd sbatch squeue scontrol; do
        PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null || missing=1
    done
    [[ $missing == 1 ]] || return 0
    echo "slurm-up: installing munge and slurm" >&2
    # The packages' scripts must not start services: the daemons are ours to start.
    local made=0 status=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends munge slurm-wlm; } || status=$?
    [[ $made == 0 ]] || rm -f /usr/sbin/policy-rc.d
    return $status
}

[[ $# == 1 && -n $1 ]] || { echo "usage: $0 --install | STATE_DIR" >&2; exit 2; }
[[ $EUID == 0 ]] || { echo "slurm-up: must run as root" >&2; exit 2; }
install_packages
[[ $1 == --install ]] && exit 0

export PATH=$PATH:/usr/sbin
mkdir -p "$1"
STATE=$(cd "$1" && pwd -P)
NODE=$(hostname -s)
mkdir -p "$STATE"/{log,ctld,spool,munge} /etc/slurm
chmod 755 "$STATE" "$STATE/munge"  # munged refuses group- or world-writable folders
SOCKET=$STATE/munge/munge.socket.2

fail() {
    echo "slurm-up: $*" >&2
    tail -n 20 "$STATE"/log/*.log "$STATE"/log/*.out >&2 2>/dev/null || true
    exit 1
}
alive() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }
wait_alive() {
    for _ in $(seq 100); do alive "$1" && return 0; sleep 0.1; done
    fail "$2 did not start"
}
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! alive "$STATE/slurmctld.pid"; then
    port_taken 6817 && fail "port 6817 is taken: another SLURM runs here; stop it first"
    port_taken 6818 && fail "port 6818 is taken: another slurmd runs here; stop it first"
fi

# Never replace the config of a real cluster this machine may belong to.
if [[ -e /etc/slurm/slurm.conf ]] && ! grep -q '^# Written by ci/slurm-up.sh' /etc/slurm/slurm.conf; then
    fail "/etc/slurm/slurm.conf was not written by ci/slurm-up.sh; move it away first"
fi

# Memory: a little under the machine's, so that slurmd never finds less than configured.
MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
# srun's listening ports (slurmstepd calls back on them): above the kernel's ephemeral range, where
# ports published by containers are chosen. A port-forwarding rule that a dead container left on
# 127.0.0.1 once caught srun's callback port: "No route to host", and the job ran to its time limit.
read -r _ EPHEMERAL_TOP </proc/sys/net/ipv4/ip_local_port_range
SRUN_PORTS=$((EPHEMERAL_TOP < 64000 ? EPHEMERAL_TOP + 1 : 20000))
cat >/etc/slurm/slurm.conf <<EOF
# Written by ci/slurm-up.sh for $STATE: one node, everything as root.
ClusterName=helixflow
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# squeue and scontrol show a finished job for this many seconds.
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
SrunPortRange=$SRUN_PORTS-$((SRUN_PORTS + 999))
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM Gres=gpu:testgpu:2 State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
{
    echo "# Written by ci/slurm-up.sh for $STATE"
    printf "NodeName=$NODE Name=gpu Type=testgpu File=%s\n" /dev/null /dev/zero
} >/etc/slurm/gres.conf
export SLURM_CONF=/etc/slurm/slurm.conf

[[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key"
chmod 600 "$STATE/munge/munge.key"
if ! alive "$STATE/munged.pid"; then
    rm -f "$SOCKET" "$SOCKET.lock"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" || fail "munged failed"
    wait_alive "$STATE/munged.pid" munged
fi
munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null || fail "munge round trip failed"

if ! alive "$STATE/slurmctld.pid"; then
    slurmctld >>"$STATE/log/slurmctld.out" 2>&1 || fail "slurmctld failed"
    wait_alive "$STATE/slurmctld.pid" slurmctld
fi
if ! alive "$STATE/slurmd.pid"; then
    slurmd -N "$NODE" >>"$STATE/log/slurmd.out" 2>&1 || fail "slurmd failed"
    wait_alive "$STATE/slurmd.pid" slurmd
fi

for _ in $(seq 120); do
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1)
    case $state in
        idle) echo "slurm-up: node $NODE idle ($STATE)" >&2; exit 0 ;;
        *drain* | inval*) break ;;
    esac
    sleep 0.5
done
fail "node $NODE is '${state:-unknown}', not idle: $(sinfo -h -R -o %E 2>/dev/null)"
