"""What the guard lets through: the pure decision on one Docker API request (no I/O).

Default deny. A request passes only when its method and path are on :data:`ROUTES`, every query
parameter is one that route takes, and, for ``POST /containers/create``, every field of the JSON
body is one helixflow's stages use with a value that cannot reach the host (:func:`check_create`).
Calls on one container pass only for containers carrying the owner label; the proxy looks the
container up and asks :meth:`Policy.owns`. Container lists are cut to owned containers
(:meth:`Policy.owned_only`).

The Docker engine (Go's encoding/json) matches JSON keys case-insensitively, with Unicode case
folding, and lets the last of two equal keys win. So keys are compared ASCII-lowercased, keys with
other characters and keys repeated up to case are refused, and the body forwarded is the one that
was checked, serialised again (no second reading of the client's bytes by the engine).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

DOCS = "docs/airflow.md, Security"
# Host folders a stage may bind, by the setting that names them (the DAG's settings, read from the
# same environment), and whether the stage may write there.
MOUNT_SETTINGS = {
    "HELIXFLOW_DATA_DIR": "ro",
    "HELIXFLOW_RESULTS_DIR": "rw",
    "HELIXFLOW_MODELS_DIR": "ro",
    "HELIXFLOW_HOST_PROFILES_DIR": "ro",
    "HELIXFLOW_SLURM_CONF_DIR": "ro",
    "HELIXFLOW_MUNGE_SOCKET_DIR": "rw",  # munged's socket: connecting to it is a write
}
IMAGE_SETTINGS = ("HELIXFLOW_IMAGE", "HELIXFLOW_GPU_IMAGE")
DEFAULT_OWNER_LABEL = "helixflow.dag"
LABEL_PREFIX = "helixflow."
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Network modes that share nothing with the host or another container.
OWN_NETWORK_MODES = {"", "default", "bridge", "none"}
BIND_OPTIONS = {"ro", "rw", "nosuid", "nodev", "noexec", "private", "rprivate"}
GPU_DRIVERS = {"", "nvidia"}


class Refused(Exception):
    """A request the guard does not pass on; ``str()`` is the message the client gets."""

    def __init__(self, message: str, *, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Policy:
    """What helixflow's stage containers may be: images, bind mounts, networks, owner label.

    Parameters
    ----------
    images
        Exact image references a container may be created from (as the client names them).
    mounts
        Host folder -> ``"ro"`` or ``"rw"``: the only bind-mount sources, and whether writable.
    networks
        Named networks a stage container may join, besides its own (bridge/none).
    owner_label
        Label every created container must carry; only containers with it can be inspected,
        started, waited on, stopped, attached to, logged or removed.
    max_body_bytes
        Largest request body read (a container create is a few kB).
    """

    images: frozenset[str]
    mounts: Mapping[str, str]
    networks: frozenset[str] = frozenset()
    owner_label: str = DEFAULT_OWNER_LABEL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Policy:
        """The policy from the DAG's own settings (see the module docstring of the DAG) and
        ``HELIXFLOW_GUARD_OWNER_LABEL`` / ``HELIXFLOW_GUARD_MAX_BODY_BYTES``."""
        images = frozenset(environ[name] for name in IMAGE_SETTINGS if environ.get(name))
        if not images:
            raise ValueError(f"set {' or '.join(IMAGE_SETTINGS)}: the images containers may be created from")
        mounts = {}
        for name, mode in MOUNT_SETTINGS.items():
            if environ.get(name):
                folder = normal_path(environ[name])
                if folder is None:
                    raise ValueError(f"{name}={environ[name]!r}: not an absolute, normalised path")
                mounts[folder] = "rw" if "rw" in (mode, mounts.get(folder)) else "ro"
        networks = frozenset(n for n in environ.get("HELIXFLOW_STAGE_NETWORK", "").split(",") if n)
        return cls(images=images, mounts=mounts, networks=networks,
                   owner_label=environ.get("HELIXFLOW_GUARD_OWNER_LABEL", DEFAULT_OWNER_LABEL),
                   max_body_bytes=int(environ.get("HELIXFLOW_GUARD_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)))

    def owns(self, labels: Mapping[str, str] | None) -> bool:
        """Whether a container with these labels was started by helixflow."""
        return bool(labels) and self.owner_label in labels

    def owned_only(self, containers: list[dict]) -> list[dict]:
        """A ``GET /containers/json`` answer cut to the containers helixflow started."""
        return [c for c in containers if isinstance(c, dict) and self.owns(c.get("Labels"))]


@dataclass(frozen=True)
class Decision:
    """A request that passes, and what the proxy must do with it.

    ``container``: look this container up and refuse unless :meth:`Policy.owns` it.
    ``body``: the body to forward (the checked create body, serialised again).
    ``upgrade``: the engine may switch protocols (attach); its stream is passed back.
    ``owned_list``: cut the JSON answer with :meth:`Policy.owned_only`.
    """

    route: str
    container: str | None = None
    body: bytes = b""
    upgrade: bool = False
    owned_list: bool = False


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern
    name: str
    query: frozenset[str] = frozenset()
    false_only: frozenset[str] = frozenset()  # parameters taken only when false (as docker-py sends them)
    owned: bool = False  # the path names a container that must be helixflow's
    check: Callable[[Policy, dict, bytes], bytes] | None = None


VERSION = r"(?:/v[0-9]{1,2}\.[0-9]{1,3})?"
# A container's ID (or unique prefix) or name, as the engine accepts them: no dot first, so no
# "." or ".." segments.
CONTAINER = r"(?P<container>[A-Za-z0-9][A-Za-z0-9_.-]{0,254})"


def route(methods: str, path: str, name: str, query: str = "", **kwargs) -> Route:
    """A route; ``query`` lists its parameters, ``NAME=false`` for those taken only when false."""
    words = query.split()
    return Route(frozenset(methods.split()), re.compile(VERSION + path), name,
                 frozenset(w.removesuffix("=false") for w in words),
                 frozenset(w.removesuffix("=false") for w in words if w.endswith("=false")), **kwargs)


def normal_path(path: str) -> str | None:
    """``path`` without a trailing slash if it is absolute and has no ``.``, ``..`` or empty
    segment; else None (such paths are refused rather than guessed at)."""
    if not path.startswith("/") or "\x00" in path:
        return None
    trimmed = path.rstrip("/") or "/"
    if posixpath.normpath(trimmed) != trimmed or "//" in trimmed:
        return None
    return trimmed


# --- JSON reading ----------------------------------------------------------------------------

def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are ASCII and distinct up to case (see the module docstring)."""
    seen: dict[str, str] = {}
    for key, _ in pairs:
        if not key.isascii():
            raise Refused(f"JSON key {key!r} is not ASCII: refused (the engine folds keys by Unicode case)",
                          status=400)
        folded = key.lower()
        if folded in seen:
            raise Refused(f"JSON key {key!r} repeats {seen[folded]!r} (keys are case-insensitive): refused",
                          status=400)
        seen[folded] = key
    return dict(pairs)


def _no_constant(name: str):
    raise Refused(f"JSON value {name} is not JSON: refused", status=400)


def read_json(body: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, no repeated keys up to case."""
    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Refused(f"request body is not valid UTF-8 JSON: {error}", status=400) from None


def fields(obj: object, where: str) -> dict[str, tuple[str, object]]:
    """Lowercased key -> (key as sent, value) of a JSON object; null values dropped (the engine's
    default for every field)."""
    if not isinstance(obj, dict):
        raise Refused(f"{where} must be a JSON object")
    return {key.lower(): (key, value) for key, value in obj.items() if value is not None}


# --- value checks ------------------------------------------------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: object, where: str) -> None:
    if isinstance(value, str):
        return
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise Refused(f"{where} must be a string or a list of strings")


def _string_list(value: object, where: str) -> None:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise Refused(f"{where} must be a list of strings")


def _string_map(value: object, where: str) -> None:
    if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        raise Refused(f"{where} must be an object of strings")


def _kind(expected: type | tuple) -> Callable:
    def check(policy: Policy, value: object, where: str) -> None:
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise Refused(f"{where} has the wrong type")
    return check


def _limit(policy: Policy, value: object, where: str) -> None:
    if not _is_int(value) or value < -1:
        raise Refused(f"{where} must be an integer >= -1")


def _empty(reason: str) -> Callable:
    """A field that must be absent, false or empty; ``reason`` says why."""
    def check(policy: Policy, value: object, where: str) -> None:
        if value not in (False, 0, "", [], {}):
            raise Refused(f"{where}={json.dumps(value)}: {reason}")
    return check


def _one_of(allowed: set[str], reason: str) -> Callable:
    def check(policy: Policy, value: object, where: str) -> None:
        if value not in allowed:
            raise Refused(f"{where}={json.dumps(value)}: {reason}")
    return check


def _image(policy: Policy, value: object, where: str) -> None:
    if value not in policy.images:
        raise Refused(f"{where}={json.dumps(value)}: containers are created only from the helixflow images "
                      f"({', '.join(sorted(policy.images))})")


def _labels(policy: Policy, value: object, where: str) -> None:
    _string_map(value, where)
    others = sorted(key for key in value if not key.startswith(LABEL_PREFIX))
    if others:
        raise Refused(f"{where}: labels {', '.join(others)} refused; only {LABEL_PREFIX}* labels (the engine and "
                      "runtime read some labels of their own)")
    if policy.owner_label not in value:
        raise Refused(f"{where} lacks {policy.owner_label!r}: containers created through the guard carry it "
                      "(it is what lets helixflow manage them later)")


def _user(policy: Policy, value: object, where: str) -> None:
    """Not root, and not the root group: files a stage leaves in the results folder could be
    set-user/group-ID root on the host."""
    if not isinstance(value, str):
        raise Refused(f"{where} must be a string")
    for part in value.split(":", 1):
        if part == "root" or (part.isdigit() and int(part) == 0):
            raise Refused(f"{where}={json.dumps(value)}: uid/gid 0 refused (the image's own user, or "
                          "HELIXFLOW_CONTAINER_USER, must not be root)")


def _network_mode(policy: Policy, value: object, where: str) -> None:
    if value in OWN_NETWORK_MODES or value in policy.networks:
        return
    allowed = ", ".join(sorted(OWN_NETWORK_MODES - {""} | policy.networks))
    raise Refused(f"{where}={json.dumps(value)}: a stage container gets its own network namespace on "
                  f"one of: {allowed} (host, container:... and other modes share one)")


# A run's own folder in a writable helixflow folder: the DAG's run names (airflow/dags/helixflow_dag.py).
RUN_FOLDER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _run_folder_mode(policy: Policy, folder: str, where: str) -> str | None:
    """``"rw"`` for a real directory directly inside a writable helixflow folder (a run's folder,
    which the stage gets instead of every run's results), else None.

    The engine follows symlinks in a bind source, so the guard looks at the folder itself (the
    writable folders are mounted into its container at the same paths): a symlink there, planted
    to bind the host's ``/``, is refused.
    """
    parent, name = posixpath.split(folder)
    if policy.mounts.get(parent) != "rw" or not RUN_FOLDER_NAME.fullmatch(name):
        return None
    try:
        status = os.lstat(folder)
    except OSError as error:
        raise Refused(f"{where}: {folder!r} cannot be checked by the guard ({error.strerror}); a run folder must "
                      f"exist and {parent} be mounted into the guard at the same path") from None
    if not stat.S_ISDIR(status.st_mode):
        raise Refused(f"{where}: {folder!r} is not a directory (a symlink or file); a run folder must be one")
    return "rw"


def _mount_source(policy: Policy, source: object, read_only: bool, where: str) -> None:
    if not isinstance(source, str):
        raise Refused(f"{where}: the source must be a string")
    if not source.startswith("/"):
        raise Refused(f"{where}: {source!r} names a volume; only bind mounts of the helixflow folders are allowed")
    folder = normal_path(source)
    mode = (policy.mounts.get(folder) or _run_folder_mode(policy, folder, where)) if folder else None
    if mode is None:
        allowed = ", ".join(f"{path} ({m})" for path, m in sorted(policy.mounts.items())) or "none configured"
        raise Refused(f"{where}: bind mount of {source!r} refused; the folders a stage may bind: {allowed}")
    if mode == "ro" and not read_only:
        raise Refused(f"{where}: {source!r} may be bound read-only only (add :ro / ReadOnly: true)")


def _binds(policy: Policy, value: object, where: str) -> None:
    _string_list(value, where)
    for index, bind in enumerate(value):
        here = f"{where}[{index}]"
        parts = bind.split(":")
        if len(parts) not in (2, 3) or not parts[1].startswith("/"):
            raise Refused(f"{here}={bind!r}: expected SOURCE:TARGET[:OPTIONS] with absolute paths")
        options = set(parts[2].split(",")) if len(parts) == 3 else set()
        unknown = options - BIND_OPTIONS
        if unknown:
            raise Refused(f"{here}: bind options {', '.join(sorted(unknown))} refused (allowed: "
                          f"{', '.join(sorted(BIND_OPTIONS))}; z/Z relabel and U chowns host files, "
                          "shared propagation reaches the host)")
        if {"ro", "rw"} <= options:
            raise Refused(f"{here}: both ro and rw")
        _mount_source(policy, parts[0], "ro" in options, here)


MOUNT_FIELDS = {"type", "source", "target", "readonly", "bindoptions", "consistency"}


def _mounts(policy: Policy, value: object, where: str) -> None:
    if not isinstance(value, list):
        raise Refused(f"{where} must be a list")
    for index, mount in enumerate(value):
        here = f"{where}[{index}]"
        given = fields(mount, here)
        extra = set(given) - MOUNT_FIELDS
        if extra:
            raise Refused(f"{here}: {', '.join(given[k][0] for k in sorted(extra))} refused (volume, tmpfs and "
                          "image mounts are not allowed)")
        kind = given.get("type", (None, None))[1]
        if kind != "bind":
            raise Refused(f"{here}: Type={json.dumps(kind)} refused; only bind mounts of the helixflow folders")
        if not isinstance(given.get("target", (None, None))[1], str):
            raise Refused(f"{here}: Target must be a path")
        if given.get("consistency", (None, ""))[1] not in ("", "default"):
            raise Refused(f"{here}: Consistency refused")
        read_only = given.get("readonly", (None, False))[1]
        if not isinstance(read_only, bool):
            raise Refused(f"{here}: ReadOnly must be true or false")
        for key, (name, option) in fields(given.get("bindoptions", (None, {}))[1], f"{here}.BindOptions").items():
            if key == "propagation" and option in ("", "private", "rprivate"):
                continue
            if key == "nonrecursive" and option is False:
                continue
            raise Refused(f"{here}.BindOptions.{name}={json.dumps(option)} refused (only private propagation)")
        _mount_source(policy, given.get("source", (None, None))[1], read_only, here)


DEVICE_REQUEST_FIELDS = {"driver", "count", "deviceids", "capabilities", "options"}


def _device_requests(policy: Policy, value: object, where: str) -> None:
    if not isinstance(value, list):
        raise Refused(f"{where} must be a list")
    for index, request in enumerate(value):
        here = f"{where}[{index}]"
        given = {key: v for key, (_, v) in fields(request, here).items()}
        extra = set(given) - DEVICE_REQUEST_FIELDS
        if extra:
            raise Refused(f"{here}: {', '.join(sorted(extra))} refused")
        capabilities = given.get("capabilities", [])
        if (given.get("driver", "") not in GPU_DRIVERS or not capabilities
                or not all(isinstance(c, list) and "gpu" in c and all(isinstance(x, str) for x in c)
                           for c in capabilities)):
            raise Refused(f"{here}: only GPU device requests (Capabilities [[\"gpu\", ...]], driver nvidia) "
                          "are allowed")
        if given.get("options"):
            raise Refused(f"{here}.Options refused (driver options are not needed for GPUs)")
        if not _is_int(given.get("count", 0)):
            raise Refused(f"{here}.Count must be an integer")
        _string_list(given.get("deviceids", []), f"{here}.DeviceIDs")


def _security_opt(policy: Policy, value: object, where: str) -> None:
    _string_list(value, where)
    for option in value:
        if option.replace("=", ":") not in ("no-new-privileges", "no-new-privileges:true"):
            raise Refused(f"{where}: {option!r} refused; only no-new-privileges (seccomp, apparmor and label "
                          "options could weaken the confinement)")


def _log_config(policy: Policy, value: object, where: str) -> None:
    given = {key: v for key, (_, v) in fields(value, where).items()}
    if set(given) - {"type", "config"}:
        raise Refused(f"{where}: only Type and Config")
    if given.get("type", "") not in ("", "json-file", "k8s-file", "journald", "local", "none"):
        raise Refused(f"{where}.Type={json.dumps(given['type'])}: only local log drivers")
    config = given.get("config", {})
    _string_map(config, f"{where}.Config")
    if set(config) - {"max-size", "max-file"}:
        raise Refused(f"{where}.Config: only max-size and max-file")


def _restart_policy(policy: Policy, value: object, where: str) -> None:
    given = {key: v for key, (_, v) in fields(value, where).items()}
    if given.get("name", "") not in ("", "no") or given.get("maximumretrycount", 0) != 0 or set(given) - {
            "name", "maximumretrycount"}:
        raise Refused(f"{where}: restarts are Airflow's job (retries), not the engine's")


def _ulimits(policy: Policy, value: object, where: str) -> None:
    if not isinstance(value, list):
        raise Refused(f"{where} must be a list")
    for index, limit in enumerate(value):
        given = {key: v for key, (_, v) in fields(limit, f"{where}[{index}]").items()}
        if set(given) - {"name", "soft", "hard"} or not isinstance(given.get("name"), str):
            raise Refused(f"{where}[{index}]: Name, Soft and Hard only")


def _bool(policy: Policy, value: object, where: str) -> None:
    if not isinstance(value, bool):
        raise Refused(f"{where} must be true or false")


def _any_strings(policy: Policy, value: object, where: str) -> None:
    _strings(value, where)


def _str_list(policy: Policy, value: object, where: str) -> None:
    _string_list(value, where)


def _str_map(policy: Policy, value: object, where: str) -> None:
    _string_map(value, where)


_str = _kind(str)

CONFIG_FIELDS: dict[str, Callable] = {
    "image": _image, "cmd": _any_strings, "entrypoint": _any_strings, "env": _str_list, "labels": _labels,
    "user": _user, "workingdir": _str, "hostname": _str, "domainname": _str, "stopsignal": _str,
    "stoptimeout": _kind(int), "tty": _bool, "openstdin": _bool, "stdinonce": _bool, "attachstdin": _bool,
    "attachstdout": _bool, "attachstderr": _bool, "networkdisabled": _bool, "argsescaped": _bool,
    "exposedports": _empty("exposed ports are not needed by the stages"),
    "volumes": _empty("anonymous volumes are not needed by the stages (results go to the results folder)"),
    "networkingconfig": _empty("network endpoints beyond NetworkMode are not needed"),
}
HOST_FIELDS: dict[str, Callable] = {
    "binds": _binds, "mounts": _mounts, "networkmode": _network_mode, "devicerequests": _device_requests,
    "securityopt": _security_opt, "logconfig": _log_config, "restartpolicy": _restart_policy, "ulimits": _ulimits,
    **{name: _limit for name in ("memory", "memoryswap", "memoryreservation", "nanocpus", "cpushares",
                                 "cpuperiod", "cpuquota", "shmsize", "pidslimit", "memoryswappiness")},
    "cpusetcpus": _str, "cpusetmems": _str, "autoremove": _bool, "init": _bool, "readonlyrootfs": _bool,
    "capdrop": _str_list, "tmpfs": _str_map, "dns": _str_list, "dnssearch": _str_list, "dnsoptions": _str_list,
    "extrahosts": _str_list,
    "privileged": _empty("privileged containers are refused (full access to the host's devices and kernel)"),
    "capadd": _empty("added capabilities are refused"),
    "devices": _empty("host devices are refused (GPUs go through DeviceRequests)"),
    "devicecgrouprules": _empty("device cgroup rules are refused"),
    "pidmode": _empty("the host's (or another container's) PID namespace is refused"),
    "utsmode": _empty("the host's UTS namespace is refused"),
    "usernsmode": _empty("the user namespace mode may not be changed"),
    "ipcmode": _one_of({"", "private", "none"}, "the host's (or another container's) IPC namespace is refused"),
    "cgroupnsmode": _one_of({"", "private"}, "the host's cgroup namespace is refused"),
    "portbindings": _empty("publishing ports on the host is refused"),
    "publishallports": _empty("publishing ports on the host is refused"),
    "oomkilldisable": _empty("the OOM killer must stay on"),
}


def _check_fields(policy: Policy, obj: object, table: dict[str, Callable], where: str) -> None:
    for key, (name, value) in fields(obj, where).items():
        check = table.get(key)
        if check is None:
            raise Refused(f"{where}.{name}: not among the fields helixflow's stages use; refused ({DOCS})")
        check(policy, value, f"{where}.{name}")


def check_create(policy: Policy, query: dict, body: bytes) -> bytes:
    """Check a ``POST /containers/create`` body; return it serialised again (what is forwarded).

    Raises
    ------
    Refused
        Naming the first field that is not allowed and why.
    """
    if not body:
        raise Refused("container create without a body", status=400)
    config = read_json(body)
    given = fields(config, "body")
    if "image" not in given:
        raise Refused("body.Image is missing")
    if "labels" not in given:
        raise Refused(f"body.Labels is missing: containers created through the guard carry {policy.owner_label!r}")
    host_config = given.pop("hostconfig", (None, {}))
    _check_fields(policy, {name: value for name, value in given.values()}, CONFIG_FIELDS, "body")
    _check_fields(policy, host_config[1], HOST_FIELDS, "body.HostConfig")
    return json.dumps(config, separators=(",", ":")).encode()


def _reference_filter(policy: Policy, query: dict, body: bytes) -> bytes:
    """``GET /images/json`` only to ask whether an allowed image exists (DockerOperator does)."""
    names: object = query.get("filter")
    if "filters" in query:
        filters = read_json(query["filters"].encode())
        given = {key: v for key, (_, v) in fields(filters, "filters").items()}
        if set(given) != {"reference"}:
            raise Refused("images may be listed only with a reference filter naming a helixflow image")
        names = given["reference"]
    names = [names] if isinstance(names, str) else list(names or [])
    if not names or not all(name in policy.images for name in names):
        raise Refused(f"images may be listed only with a reference filter naming helixflow images "
                      f"({', '.join(sorted(policy.images))})")
    return b""


ROUTES = [
    route("GET HEAD", "/_ping", "ping"),
    route("GET", "/version", "version"),
    route("GET", "/images/json", "image list", "all filters filter only_ids digests", check=_reference_filter),
    route("GET", "/images/(?P<image>[A-Za-z0-9][A-Za-z0-9_./:@-]*)/json", "image inspect"),
    route("POST", "/containers/create", "container create", "name platform", check=check_create),
    route("GET", "/containers/json", "container list", "all limit size filters since before trunc_cmd"),
    route("GET", f"/containers/{CONTAINER}/json", "container inspect", "size", owned=True),
    route("POST", f"/containers/{CONTAINER}/start", "container start", owned=True),
    route("POST", f"/containers/{CONTAINER}/wait", "container wait", "condition", owned=True),
    route("GET", f"/containers/{CONTAINER}/logs", "container logs",
          "follow stdout stderr since until timestamps tail", owned=True),
    route("POST", f"/containers/{CONTAINER}/stop", "container stop", "t signal", owned=True),
    route("POST", f"/containers/{CONTAINER}/kill", "container kill", "signal", owned=True),
    route("POST", f"/containers/{CONTAINER}/attach", "container attach", "logs stream stdout stderr", owned=True),
    route("DELETE", f"/containers/{CONTAINER}", "container remove", "force v link=false", owned=True),
]
# Why the best-known calls off the list are refused (anything else: "not among the calls ...").
REFUSED_CALLS = [
    (r"/containers/[^/]+/exec|/exec/", "exec runs commands inside a container"),
    (r"/containers/[^/]+/archive", "archive reads and writes files inside a container"),
    (r"/containers/[^/]+/export", "export copies a container's whole file system"),
    (r"/commit", "commit turns a container into an image"),
    (r"/containers/[^/]+/attach/ws", "websocket attach gives a container's stdin"),
    (r"/containers/[^/]+/update", "update changes a container's limits after the checks"),
    (r"/containers/[^/]+/(rename|pause|unpause|restart|resize|changes|top|stats)", "not needed by helixflow"),
    (r"/images/create", "image pull: images come from the local build, never from a registry"),
    (r"/build", "image build is done outside the stack (ci/build-image.sh)"),
    (r"/images/(load|get)|/images/[^?]+/(push|tag|get|history)", "image load/save/push/tag is not needed"),
    (r"/images/", "images may only be inspected, by their helixflow names"),
    (r"/volumes", "volume calls are refused (stages bind only the helixflow folders)"),
    (r"/networks", "network calls are refused (the stack's networks come from compose)"),
    (r"/(swarm|nodes|services|tasks|secrets|configs|plugins|distribution|session|auth)",
     "swarm, plugin, secret, registry and session calls are refused"),
    (r"/(info|system|events)", "system-wide information is not needed by helixflow"),
    (r"/libpod/", "podman's own API is refused (the DAG speaks the Docker API)"),
]


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """Path and query parameters of a request target, refusing anything the engine might read
    differently: encoded or non-ASCII characters in the path, dot or empty segments, absolute
    URLs, repeated parameters (up to case), ``;`` and bad escapes in the query."""
    if not target.startswith("/") or not target.isascii() or "#" in target:
        raise Refused(f"request target {target!r}: only origin-form paths", status=400)
    path, _, query_string = target.partition("?")
    if "%" in path or "\\" in path:
        raise Refused(f"path {path!r}: percent-encoded characters and backslashes are refused")
    segments = path.split("/")[1:]
    if any(segment in ("", ".", "..") for segment in segments) and path != "/":
        raise Refused(f"path {path!r}: empty, '.' and '..' segments (and trailing slashes) are refused")
    if ";" in query_string or re.search(r"%(?![0-9A-Fa-f]{2})", query_string):
        raise Refused(f"query {query_string!r}: ';' and malformed escapes are refused", status=400)
    try:
        pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True, strict_parsing=bool(query_string),
                                       errors="strict")
    except (ValueError, UnicodeDecodeError) as error:
        raise Refused(f"query {query_string!r}: {error}", status=400) from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key.lower() in query:
            raise Refused(f"query parameter {key!r} given twice (up to case): refused")
        query[key.lower()] = value
    return path, query


def decide(policy: Policy, method: str, target: str, body: bytes, *, upgrade: bool = False) -> Decision:
    """The decision on one request (method, request target, body; ``upgrade``: the client asked
    to switch protocols).

    Raises
    ------
    Refused
        With the message the client gets: what was refused and why.
    """
    path, query = split_target(target)
    for candidate in ROUTES:
        match = candidate.pattern.fullmatch(path)
        if match and method in candidate.methods:
            break
    else:
        for pattern, reason in REFUSED_CALLS:
            if re.match(VERSION + "(?:" + pattern + ")", path):
                raise Refused(f"{method} {path} refused: {reason}")
        raise Refused(f"{method} {path} refused: not among the calls helixflow's DAG makes ({DOCS})")
    unknown = set(query) - candidate.query
    if unknown:
        raise Refused(f"{candidate.name}: query parameters {', '.join(sorted(unknown))} refused "
                      f"(allowed: {', '.join(sorted(candidate.query)) or 'none'})")
    for name in candidate.false_only & set(query):
        if query[name].lower() not in ("", "0", "false"):
            raise Refused(f"{candidate.name}: {name}={query[name]} refused")
    if upgrade and candidate.name != "container attach":
        raise Refused(f"{candidate.name}: protocol upgrade refused (only attach streams)")
    if candidate.name == "image inspect" and match["image"] not in policy.images:
        raise Refused(f"image inspect of {match['image']!r} refused: only the helixflow images "
                      f"({', '.join(sorted(policy.images))})")
    forwarded = b""
    if candidate.check is not None:
        forwarded = candidate.check(policy, query, body)
    elif body:
        raise Refused(f"{candidate.name}: a request body is refused (this call takes none)")
    return Decision(route=candidate.name, container=match["container"] if candidate.owned else None,
                    body=forwarded, upgrade=candidate.name == "container attach",
                    owned_list=candidate.name == "container list")
