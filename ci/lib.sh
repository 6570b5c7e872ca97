# Sourced by ci/*.sh. Messages go to stderr: podman-up.sh's stdout is for `eval`.
log() { printf '[ci] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# apt-get install the given packages when one of the commands is missing (root only).
ensure_apt() {  # ensure_apt "cmd1 cmd2" pkg...
    local cmds=$1; shift
    local cmd missing=0
    for cmd in $cmds; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
    [ "$missing" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing one of: $cmds (apt-get install $*)"
    log "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q -o DPkg::Lock::Timeout=600 "$@" >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q -o DPkg::Lock::Timeout=600 "$@" >&2; } \
        || die "apt-get install $* failed"
}

# containers.conf for this VM: runc (crun fails on the hybrid cgroup layout), cgroupfs
# (no systemd), file events (no journald), ulimits within the VM's hard limits. Networks live in
# the state dir, on subnets derived from its path, so that several podman states on one machine
# (the helpers of a shared host, or a second test run) never share a network name or a subnet.
write_containers_conf() {  # write_containers_conf FILE STATE_DIR
    local nofile nproc octet
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    octet=$((100 + $(printf '%s' "$2" | cksum | cut -d' ' -f1) % 100))
    mkdir -p "$2/networks"
    cat >"$1" <<CONF
# written by helixflow ci/podman-up.sh
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_config_dir = "$2/networks"
default_subnet_pools = [{"base" = "10.${octet}.0.0/16", "size" = 24}]
CONF
}

# Netavark keeps one aardvark-dns file per network name in a run dir shared by every rootful
# podman (/run/containers/networks/aardvark-dns): a gateway line, then one line per container.
# A stack killed before `down` leaves its file behind, and netavark appends to an existing file
# without rewriting its gateway line: the next network of that name on another subnet then gets
# no DNS ("could not translate host name"). Remove the helixflow files none of whose containers
# runs any more.
drop_stale_dns_files() {
    local dir=/run/containers/networks/aardvark-dns running file id live
    [ "$(id -u)" = 0 ] || dir=${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/containers/networks/aardvark-dns
    [ -d "$dir" ] || return 0
    running=$(podman ps -q --no-trunc 2>/dev/null) || return 0
    for file in "$dir"/helixflow*; do
        [ -f "$file" ] || continue
        live=0
        while read -r id _; do
            grep -qxF -- "$id" <<<"$running" && { live=1; break; }
        done < <(tail -n +2 -- "$file")
        [ "$live" = 1 ] || { log "removing stale aardvark-dns entries $file"; rm -f -- "$file"; }
    done
}

# storage.conf with the images and containers under DIR (PODMAN_STORAGE_DIR of podman-up.sh).
write_storage_conf() {  # write_storage_conf FILE DIR
    mkdir -p "$2/root" "$2/run"
    printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/root"\nrunroot = "%s/run"\n' "$2" "$2" >"$1"
}

# PID alive and its command line contains NEEDLE (not a recycled PID).
pid_is() {
    [[ "$1" =~ ^[0-9]+$ ]] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}

ping_socket() { curl -fsS --max-time 5 --unix-socket "$1" http://d/_ping >/dev/null 2>&1; }
