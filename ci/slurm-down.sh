#!/usr/bin/env bash
# ci/slurm-down.sh STATE_DIR: stop the cluster that ci/slurm-up.sh STATE_DIR started.
# Cancels jobs still known, then stops slurmd, slurmctld and munged by the pids in
# STATE_DIR (TERM, then KILL after 15 s), and removes the config files slurm-up wrote.
# Nothing running is fine; logs and jobcomp.txt stay in STATE_DIR.
set -uo pipefail
[[ $# == 1 && -n $1 ]] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
STATE=$1
export PATH=$PATH:/usr/sbin SLURM_CONF=/etc/slurm/slurm.conf

stop() {  # stop PIDFILE
    local pid
    [[ -s $1 ]] || return 0
    pid=$(<"$1")
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null && echo "slurm-down: killed $pid ($1)" >&2
    fi
    rm -f "$1"
}

if [[ -s $STATE/slurmctld.pid ]] && kill -0 "$(<"$STATE/slurmctld.pid")" 2>/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null)
    if [[ -n $jobs ]]; then
        timeout 10 scancel $jobs
        for _ in $(seq 30); do [[ -z $(timeout 5 squeue -h -o %A) ]] && break; sleep 1; done
    fi
fi
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/munged.pid"
# The config goes too, if slurm-up wrote it for this very STATE_DIR.
if [[ -d $STATE ]] && grep -qF "# Written by ci/slurm-up.sh for $(cd "$STATE" && pwd -P):" /etc/slurm/slurm.conf 2>/dev/null; then
    rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
fi
exit 0
