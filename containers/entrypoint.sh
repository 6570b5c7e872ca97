#!/bin/sh
# Entry point of the helixflow images.
#  * no arguments: `helixflow info` (versions, device, the model's metadata and precision), with
#    the model from $HELIXFLOW_MODELS_DIR, else $HELIXFLOW_DATA_DIR/models, else the baked-in models;
#  * otherwise `helixflow ARGS...`, after checking that the data folder ($HELIXFLOW_DATA_DIR,
#    /data) exists and is readable, so a forgotten or wrong mount is one clear line, not a traceback;
#  * HELIXFLOW_WORKDIR: created and used as the working directory (snakemake keeps its state there);
#  * run as another user (--user UID, e.g. the results folder's owner), who has no home in the
#    image: HOME becomes a fresh folder in /tmp (snakemake, matplotlib and torch keep caches there).
set -eu
if [ ! -w "${HOME:-/}" ]; then
    HOME=$(mktemp -d /tmp/home.XXXXXX)
    export HOME
fi
data=${HELIXFLOW_DATA_DIR:-/data}
models=${HELIXFLOW_MODELS_DIR:-}
if [ -z "$models" ]; then
    if [ -d "$data/models" ]; then models=$data/models; else models=/opt/helixflow-models; fi
fi
if [ -n "${HELIXFLOW_WORKDIR:-}" ]; then
    mkdir -p "$HELIXFLOW_WORKDIR" || { echo "helixflow: error: cannot create working folder $HELIXFLOW_WORKDIR (is the results folder mounted read-write and writable by uid $(id -u)?)" >&2; exit 2; }
    cd "$HELIXFLOW_WORKDIR"
fi
if [ $# -eq 0 ]; then
    exec helixflow info --profile "${HELIXFLOW_PROFILE:-tiny}" --models-dir "$models"
fi
case "$1" in
    info|profile|--help|-h|demo-data) exec helixflow "$@" ;;
    helixflow) shift ;;
    sh|bash|python|snakemake) exec "$@" ;;
esac
if [ ! -d "$data" ]; then
    echo "helixflow: error: $data: data folder missing; mount it, e.g. -v /path/to/data:$data:ro" >&2
    exit 2
fi
if [ ! -r "$data" ] || [ ! -x "$data" ]; then
    echo "helixflow: error: $data: data folder not readable by uid $(id -u); make it readable (chmod a+rX) or run with --user" >&2
    exit 2
fi
exec helixflow "$@"
