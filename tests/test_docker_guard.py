"""The Docker API guard (src/helixflow_guard): its policy alone, then in front of podman's real API.

The escalation matrix sends each way to the host (privileged, ``/`` bound, added capabilities, host
namespaces, devices, exec, archive, other containers, other images, pull, build, volumes, networks,
path tricks) through the guard and checks the 403 and that podman holds nothing new; the allowed
path runs Airflow's DockerOperator and raw calls through the same guard. The podman tests skip
without podman (and fail under CI=true).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from airflow_helpers import AIRFLOW_VENV, require_airflow
from conftest import PROJECT_DIR, require_service
from helixflow_guard.policy import Policy, Refused, decide
from prometheus_stack import free_port, stop_process_group

IMAGE = "localhost/guard-test:1"
OWNER = "helixflow.dag"
TEST_LABEL = {"helixflow.test": "1"}  # ci/podman-down.sh removes what is left with it


def stage_body(data: str, results: str, **host_config) -> dict:
    """A create body as DockerOperator sends it (docker-py 7: create_container_config)."""
    body = {
        "ExposedPorts": {}, "Tty": False, "OpenStdin": False, "StdinOnce": False, "AttachStdin": False,
        "AttachStdout": True, "AttachStderr": True, "Env": ["HELIXFLOW_WORKDIR=/results/run"],
        "Cmd": ["bash", "-c", "cat /data/in.txt"], "Image": IMAGE, "NetworkDisabled": False,
        "Labels": {OWNER: "helixflow", **TEST_LABEL},
        "HostConfig": {
            "Memory": 536870912, "ShmSize": 268435456, "NetworkMode": "bridge", "PortBindings": {},
            "LogConfig": {"Type": None, "Config": {}}, "CpuShares": 1024,
            "Mounts": [{"Target": "/data", "Source": data, "Type": "bind", "ReadOnly": True},
                       {"Target": "/results", "Source": results, "Type": "bind", "ReadOnly": False}],
        },
    }
    body["HostConfig"].update(host_config)
    return body


# --- the policy alone --------------------------------------------------------------------------

DATA, RESULTS = "/srv/data", "/srv/results"
POLICY = Policy(images=frozenset({IMAGE, "localhost/guard-test-gpu:1"}), mounts={DATA: "ro", RESULTS: "rw"},
                networks=frozenset({"helixflow-metrics"}))


def refusal(method: str, target: str, body: bytes = b"", **kwargs) -> Refused:
    with pytest.raises(Refused) as caught:
        decide(POLICY, method, target, body, **kwargs)
    return caught.value


def create(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_policy_passes_the_create_dockeroperator_sends_and_forwards_what_it_checked():
    body = stage_body(DATA, RESULTS, NetworkMode="helixflow-metrics", SecurityOpt=["no-new-privileges"],
                      CapDrop=["ALL"], Init=True,
                      DeviceRequests=[{"Driver": "", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}])
    decision = decide(POLICY, "POST", "/v1.41/containers/create?name=helixflow-run-1", create(body))
    assert decision.route == "container create"
    assert json.loads(decision.body) == body


# Each: a change to the allowed body, and words the refusal must contain.
CREATE_ESCALATIONS = {
    "privileged": ({"Privileged": True}, "privileged"),
    "privileged, lower-case key": ({"privileged": True}, "privileged"),
    "root bound": ({"Binds": ["/:/host"]}, "'/' refused"),
    "root bound as a mount": ({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}, "'/' refused"),
    "cap_add": ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
    "host pid": ({"PidMode": "host"}, "PID namespace"),
    "other container's pid": ({"PidMode": "container:postgres"}, "PID namespace"),
    "host network": ({"NetworkMode": "host"}, "own network namespace"),
    "other container's network": ({"NetworkMode": "container:postgres"}, "own network namespace"),
    "host ipc": ({"IpcMode": "host"}, "IPC namespace"),
    "host uts": ({"UTSMode": "host"}, "UTS"),
    "host userns": ({"UsernsMode": "host"}, "user namespace"),
    "host cgroupns": ({"CgroupnsMode": "host"}, "cgroup namespace"),
    "a device": ({"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda",
                               "CgroupPermissions": "rwm"}]}, "devices"),
    "a non-GPU device request": ({"DeviceRequests": [{"Driver": "cdi", "DeviceIDs": ["vendor.com/x=1"]}]}, "GPU"),
    "seccomp unconfined": ({"SecurityOpt": ["seccomp=unconfined"]}, "seccomp=unconfined"),
    "apparmor unconfined": ({"SecurityOpt": ["apparmor=unconfined"]}, "apparmor"),
    "label disable": ({"SecurityOpt": ["label=disable"]}, "label=disable"),
    "data folder read-write": ({"Binds": [f"{DATA}:/data"]}, "read-only only"),
    "data folder read-write mount": ({"Mounts": [{"Type": "bind", "Source": DATA, "Target": "/data"}]},
                                     "read-only only"),
    "parent of the data folder": ({"Binds": ["/srv:/srv:ro"]}, "refused"),
    "dot-dot out of the results": ({"Binds": [f"{RESULTS}/../../etc:/x"]}, "refused"),
    "selinux relabel": ({"Binds": [f"{RESULTS}:/results:Z"]}, "Z"),
    "shared propagation": ({"Binds": [f"{RESULTS}:/results:rshared"]}, "rshared"),
    "named volume bind": ({"Binds": ["postgres-data:/var/lib/postgresql/data"]}, "volume"),
    "volume mount": ({"Mounts": [{"Type": "volume", "Source": "postgres-data", "Target": "/x"}]}, "volume"),
    "volumes from": ({"VolumesFrom": ["postgres"]}, "VolumesFrom"),
    "sysctls": ({"Sysctls": {"kernel.shm_rmid_forced": "1"}}, "Sysctls"),
    "cgroup parent": ({"CgroupParent": "/"}, "CgroupParent"),
    "runtime": ({"Runtime": "unsafe"}, "Runtime"),
    "unmasked /proc": ({"MaskedPaths": []}, "MaskedPaths"),
    "published port": ({"PortBindings": {"22/tcp": [{"HostPort": "2222"}]}}, "publishing"),
    "restart always": ({"RestartPolicy": {"Name": "always"}}, "restarts"),
    "syslog to the network": ({"LogConfig": {"Type": "syslog", "Config": {"syslog-address": "tcp://x:1"}}},
                              "log drivers"),
    "OOM killer off": ({"OomKillDisable": True}, "OOM"),
}


def test_policy_passes_a_runs_own_folder_and_refuses_what_only_looks_like_one(tmp_path):
    """A stage binds its run's folder (a real directory directly in the results folder), not a
    symlink planted there to bind the host's /, nor anything deeper or outside."""
    results = tmp_path / "results"
    (results / "run-1").mkdir(parents=True)
    (results / "escape").symlink_to("/")
    (results / "run-1" / "deeper").mkdir()
    policy = Policy(images=frozenset({IMAGE}), mounts={DATA: "ro", str(results): "rw"})

    def create_with(source: str, read_only: bool = False) -> bytes:
        body = stage_body(DATA, str(results))
        body["HostConfig"]["Mounts"][1].update(Source=source, ReadOnly=read_only)
        return decide(policy, "POST", "/v1.41/containers/create", create(body))

    assert create_with(str(results / "run-1"))
    for source, words in [(results / "escape", "not a directory"), (results / "missing", "cannot be checked"),
                          (results / "run-1" / "deeper", "refused"), (results / ".hidden", "refused"),
                          (tmp_path / "run-1", "refused")]:
        with pytest.raises(Refused) as caught:
            create_with(str(source))
        assert words in str(caught.value), source
    with pytest.raises(Refused, match="refused"):  # a read-only folder has no writable run folders
        decide(Policy(images=frozenset({IMAGE}), mounts={str(results): "ro"}), "POST", "/v1.41/containers/create",
               create(stage_body(str(results), str(results / "run-1"))))


@pytest.mark.parametrize("change", CREATE_ESCALATIONS.values(), ids=CREATE_ESCALATIONS.keys())
def test_policy_refuses_each_escalation_in_a_create(change):
    host_config, words = change
    refused = refusal("POST", "/v1.41/containers/create", create(stage_body(DATA, RESULTS, **host_config)))
    assert refused.status == 403 and words in str(refused)


@pytest.mark.parametrize("change, words", [
    ({"Image": "docker.io/library/alpine:3"}, "only from the helixflow images"),
    ({"Image": "localhost/guard-test"}, "only from the helixflow images"),  # no tag: another image
    ({"Labels": TEST_LABEL}, OWNER),
    ({"Volumes": {"/anon": {}}}, "anonymous volumes"),
    ({"Binds": ["/:/host"]}, "Binds: not among the fields"),  # the pre-1.24 top-level HostConfig fields
    ({"Privileged": True}, "Privileged: not among the fields"),
    ({"NetworkingConfig": {"EndpointsConfig": {"host": {}}}}, "network endpoints"),
    ({"ExposedPorts": {"22/tcp": {}}}, "exposed ports"),
    ({"User": "root"}, "uid/gid 0"),
    ({"User": "1000:00"}, "uid/gid 0"),
    ({"Labels": {OWNER: "helixflow", "com.example.other": "1"}}, "only helixflow.* labels"),
], ids=["other image", "untagged name", "no owner label", "anonymous volume", "legacy top-level Binds",
        "legacy top-level Privileged", "networking config", "exposed ports", "root user", "root group",
        "other labels"])
def test_policy_refuses_other_images_and_fields_outside_host_config(change, words):
    body = {**stage_body(DATA, RESULTS), **change}
    assert words in str(refusal("POST", "/containers/create", create(body)))


@pytest.mark.parametrize("raw, words", [
    (b'{"Image": "localhost/guard-test:1", "HostConfig": {"Privileged": false, "privileged": true}}', "repeats"),
    ('{"Image": "localhost/guard-test:1", "HostConfig": {"\u017fecurityOpt": ["seccomp=unconfined"]}}'.encode(),
     "not ASCII"),  # Go folds the long s into "s"
    (b'{"Image": "localhost/guard-test:1", "Labels": {"helixflow.dag": "x"}, "StopTimeout": NaN}', "NaN"),
    (b'\xff\xfe{}', "UTF-8"),
    (b'["not", "an", "object"]', "JSON object"),
    (b'', "without a body"),
], ids=["keys repeated up to case", "non-ASCII key", "NaN", "not UTF-8", "not an object", "empty"])
def test_policy_refuses_json_the_engine_could_read_differently(raw, words):
    refused = refusal("POST", "/containers/create", raw)
    assert words in str(refused)


@pytest.mark.parametrize("method, target, words", [
    ("POST", "/v1.41/containers/abc/exec", "exec"),
    ("POST", "/v1.41/exec/abc/start", "exec"),
    ("GET", "/v1.41/containers/abc/archive?path=/etc", "archive"),
    ("PUT", "/v1.41/containers/abc/archive?path=/", "archive"),
    ("HEAD", "/v1.41/containers/abc/archive?path=/", "archive"),
    ("GET", "/v1.41/containers/abc/export", "export"),
    ("POST", "/v1.41/commit?container=abc", "commit"),
    ("GET", "/v1.41/containers/abc/attach/ws", "websocket"),
    ("POST", "/v1.41/containers/abc/update", "update"),
    ("POST", "/v1.41/images/create?fromImage=alpine&tag=3", "pull"),
    ("POST", "/v1.41/build?t=x", "build"),
    ("POST", "/v1.41/images/load", "load"),
    ("POST", "/v1.41/images/localhost/guard-test:1/push", "push"),
    ("POST", "/v1.41/images/localhost/guard-test:1/tag?repo=x", "tag"),
    ("DELETE", "/v1.41/images/localhost/guard-test:1", "images may only be inspected"),
    ("POST", "/v1.41/volumes/create", "volume"),
    ("DELETE", "/v1.41/volumes/postgres-data", "volume"),
    ("POST", "/v1.41/networks/create", "network"),
    ("POST", "/v1.41/networks/helixflow-metrics/connect", "network"),
    ("GET", "/v1.41/info", "system-wide"),
    ("POST", "/v1.41/swarm/init", "swarm"),
    ("GET", "/v1.41/plugins", "plugin"),
    ("POST", "/v1.41/secrets/create", "secret"),
    ("POST", "/v4.0.0/libpod/containers/create", "not among"),
    ("POST", "/v1.41/libpod/containers/create", "podman's own API"),
    ("GET", "/v1.41/images/docker.io/library/postgres:16/json", "only the helixflow images"),
    ("GET", "/v1.41/images/json", "reference filter"),
    ("GET", "/v1.41/containers/json/", "trailing slashes"),
    ("POST", "/v1.41/containers/../exec", "'..' segments"),
    ("POST", "/v1.41/containers/x/../../exec", "'..' segments"),
    ("POST", "/v1.41/containers/%2e%2e/exec", "percent-encoded"),
    ("POST", "/v1.41/containers/abc%2Fexec", "percent-encoded"),
    ("POST", "//v1.41/containers/create", "empty"),
    ("POST", "/v1.41//containers/create", "empty"),
    ("POST", "/v1.41/Containers/create", "not among"),
    ("GET", "http://docker/v1.41/containers/json", "origin-form"),
    ("GET", "/v1.41/containers/json?all=1&ALL=0", "twice"),
    ("GET", "/v1.41/containers/json?all=1;filters=x", "';'"),
    ("GET", "/v1.41/containers/abc/logs?follow=1&details=%zz", "malformed escapes"),
    ("POST", "/v1.41/containers/abc/attach?stream=1&stdin=1&stdout=1", "stdin"),
    ("POST", "/v1.41/containers/abc/start?detachKeys=ctrl-p", "detachkeys"),
    ("DELETE", "/v1.41/containers/abc?force=1&link=1", "link=1"),
    ("GET", "/v1.41/version/x", "not among"),
])
def test_policy_refuses_calls_off_the_list(method, target, words):
    refused = refusal(method, target)
    assert refused.status in (400, 403) and words in str(refused), str(refused)


def test_policy_passes_a_user_that_is_not_root():
    body = {**stage_body(DATA, RESULTS), "User": "1000:1000"}
    assert decide(POLICY, "POST", "/containers/create", create(body)).route == "container create"


def test_policy_refuses_bodies_and_upgrades_where_a_call_takes_none():
    assert "body is refused" in str(refusal("POST", "/v1.41/containers/abc/start", b'{"HostConfig": {}}'))
    assert "upgrade refused" in str(refusal("GET", "/v1.41/containers/abc/logs?follow=1", upgrade=True))


@pytest.mark.parametrize("method, target", [
    ("GET", "/_ping"), ("HEAD", "/v1.41/_ping"), ("GET", "/version"), ("GET", "/v1.41/version"),
    ("GET", f"/v1.41/images/{IMAGE}/json"),
    ("GET", "/v1.41/images/json?only_ids=0&all=0&filters=%7B%22reference%22%3A+%5B%22localhost%2Fguard-test%3A1%22%5D%7D"),
    ("GET", "/v1.41/containers/json?limit=-1&all=1&size=0&trunc_cmd=0&filters=%7B%22name%22%3A+%22%5Ex%24%22%7D"),
    ("GET", "/v1.41/containers/abc/json"), ("POST", "/v1.41/containers/abc/start"),
    ("POST", "/v1.41/containers/abc/wait"), ("GET", "/v1.41/containers/abc/logs?stdout=1&stderr=1&follow=1"),
    ("POST", "/v1.41/containers/abc/stop?t=10"), ("POST", "/v1.41/containers/abc/kill?signal=SIGKILL"),
    ("POST", "/v1.41/containers/abc/attach?logs=0&stdout=1&stderr=1&stream=1"),
    ("DELETE", "/v1.41/containers/abc?v=False&link=False&force=True"),
])
def test_policy_passes_the_calls_the_dag_makes(method, target):
    decision = decide(POLICY, method, target, b"")
    assert decision.container == ("abc" if "/containers/abc" in target else None)


def test_policy_cuts_container_lists_to_helixflows_and_reads_its_settings(tmp_path):
    listed = [{"Id": "a", "Labels": {OWNER: "helixflow"}}, {"Id": "b", "Labels": {}}, {"Id": "c", "Labels": None}]
    assert [c["Id"] for c in POLICY.owned_only(listed)] == ["a"]
    policy = Policy.from_environment({"HELIXFLOW_IMAGE": IMAGE, "HELIXFLOW_DATA_DIR": f"{tmp_path}/data/",
                                      "HELIXFLOW_RESULTS_DIR": f"{tmp_path}/results",
                                      "HELIXFLOW_STAGE_NETWORK": "helixflow-metrics"})
    assert policy.images == {IMAGE} and policy.networks == {"helixflow-metrics"}
    assert policy.mounts == {f"{tmp_path}/data": "ro", f"{tmp_path}/results": "rw"}
    with pytest.raises(ValueError, match="HELIXFLOW_IMAGE"):
        Policy.from_environment({})
    with pytest.raises(ValueError, match="HELIXFLOW_DATA_DIR"):
        Policy.from_environment({"HELIXFLOW_IMAGE": IMAGE, "HELIXFLOW_DATA_DIR": "data"})


# --- in front of podman's Docker API -----------------------------------------------------------

@pytest.fixture(scope="module")
def podman():
    """podman's Docker API on a socket in a fresh state dir, and the test image (the base, tagged)."""
    require_service("podman", "the guard is tested in front of podman's Docker API")
    state = Path(tempfile.mkdtemp(prefix="hfg-", dir="/tmp"))  # a socket path must stay short
    up = subprocess.run([PROJECT_DIR / "ci" / "podman-up.sh", state], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    env = dict(os.environ)
    env.update(word.split("=", 1) for word in up.stdout.split() if "=" in word)
    try:
        base = subprocess.run([PROJECT_DIR / "ci" / "base-image.sh"], env=env, capture_output=True, text=True)
        assert base.returncode == 0, base.stderr
        # An image of its own (not a second name of the shared base), so removing it is safe.
        (state / "Containerfile").write_text(f"FROM {base.stdout.strip()}\nLABEL helixflow.guard-test=1\n")
        built = podman_cli(env, "build", "--quiet", "--pull=never", "-t", IMAGE, "-f", str(state / "Containerfile"),
                           str(state))
        assert built.returncode == 0, built.stderr
        yield {"env": env, "socket": env["DOCKER_HOST"].removeprefix("unix://"), "state": state}
    finally:
        podman_cli(env, "rmi", "--force", IMAGE)
        subprocess.run([PROJECT_DIR / "ci" / "podman-down.sh", state], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def podman_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def guard(podman, tmp_path_factory):
    """The guard as a process (``python -m helixflow_guard``) on a free port, with data/results folders."""
    folders = tmp_path_factory.mktemp("guard")
    data, results = folders / "data", folders / "results"
    data.mkdir()
    results.mkdir()
    (data / "in.txt").write_text("input for the stage\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR / "src"), "HELIXFLOW_IMAGE": IMAGE,
           "HELIXFLOW_DATA_DIR": str(data), "HELIXFLOW_RESULTS_DIR": str(results),
           "HELIXFLOW_GUARD_LISTEN": f"127.0.0.1:{port}", "HELIXFLOW_GUARD_UPSTREAM": f"unix://{podman['socket']}",
           "HELIXFLOW_GUARD_MAX_BODY_BYTES": "65536"}
    log = (folders / "guard.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "helixflow_guard"], env=env, stdout=log, stderr=log,
                               start_new_session=True)
    deadline = time.monotonic() + 30
    while call(port, "GET", "/_ping", fail_ok=True)[0] != 200:
        assert process.poll() is None and time.monotonic() < deadline, (folders / "guard.log").read_text()
        time.sleep(0.1)
    yield {"port": port, "data": str(data), "results": str(results), "log": folders / "guard.log", **podman}
    stop_process_group(process)
    log.close()


def call(port: int, method: str, target: str, body: bytes | dict | None = None, headers: dict | None = None,
         fail_ok: bool = False, timeout: float = 60) -> tuple[int, object]:
    """One raw HTTP call to the guard; the status and the JSON (or bytes) answer."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        payload = response.read()
    except ConnectionError:
        if fail_ok:
            return 0, None
        raise
    finally:
        connection.close()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload


def unique(prefix: str) -> str:
    return f"guard-{prefix}-{uuid.uuid4().hex[:8]}"


def exists(env: dict, kind: str, name: str) -> bool:
    """Whether podman holds a container/image/volume/network of that name."""
    command = {"container": ["container", "exists"], "image": ["image", "exists"], "volume": ["volume", "exists"],
               "network": ["network", "exists"]}[kind]
    return podman_cli(env, *command, name).returncode == 0


def started_container(guard, command: str = "sleep 120") -> str:
    """A running container created through the guard (owned by helixflow); its ID."""
    name = unique("run")
    body = stage_body(guard["data"], guard["results"])
    body["Cmd"] = ["bash", "-c", command]
    status, created = call(guard["port"], "POST", f"/v1.41/containers/create?name={name}", body)
    assert status == 201, created
    status, answer = call(guard["port"], "POST", f"/v1.41/containers/{created['Id']}/start")
    assert status == 204, answer
    return created["Id"]


def refused(answer: tuple[int, object], words: str) -> None:
    status, payload = answer
    assert status == 403, (status, payload)
    assert words in payload["message"], payload["message"]


def test_dockeroperator_runs_a_stage_through_the_guard(guard):
    """Airflow's own DockerOperator (the DAG's base class) through the guard: its output, the files
    it wrote, and no container left."""
    require_airflow()
    name = unique("op")
    script = f"""
import json
from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import Mount
operator = DockerOperator(task_id="stage", image={IMAGE!r}, docker_url="tcp://127.0.0.1:{guard['port']}",
    auto_remove="force", mount_tmp_dir=False, container_name={name!r}, labels={{**{TEST_LABEL!r}, {OWNER!r}: "t"}},
    command=["bash", "-c", "cat /data/in.txt; echo done > /results/out.txt; echo last line"],
    mounts=[Mount(target="/data", source={guard['data']!r}, type="bind", read_only=True),
            Mount(target="/results", source={guard['results']!r}, type="bind")],
    mem_limit="512m", cpus=1.0, shm_size=256 * 1024 * 1024)
print("RESULT", json.dumps(operator.execute({{}})))
# What HelixflowStageOperator does besides: find leftovers by label and name, stop (on_kill), remove.
cli = operator.cli
left = cli.create_container({IMAGE!r}, ["sleep", "60"], name={name!r} + "-left", labels={{{OWNER!r}: "t", **{TEST_LABEL!r}}})
cli.start(left["Id"])
by_label = cli.containers(all=True, filters={{"label": [{OWNER + "=t"!r}, "helixflow.test=1"]}})
by_name = cli.containers(all=True, filters={{"name": "^" + {name!r} + "-left$"}})
cli.stop(left["Id"], timeout=1)
cli.remove_container(left["Id"], force=True)
print("LEFTOVERS", json.dumps([[c["Id"] for c in by_label], [c["Id"] for c in by_name], left["Id"]]))
"""
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'RESULT "last line"' in done.stdout
    assert "input for the stage" in done.stdout + done.stderr  # the container's output, logged by the operator
    assert Path(guard["results"], "out.txt").read_text() == "done\n"
    assert not exists(guard["env"], "container", name)
    by_label, by_name, left = json.loads(done.stdout.split("LEFTOVERS", 1)[1])
    assert by_label == [left] and by_name == [left]
    assert not exists(guard["env"], "container", f"{name}-left")


def test_logs_stream_and_wait_holds_until_the_container_ends(guard):
    container = started_container(guard, "echo first; sleep 3; echo second")
    connection = http.client.HTTPConnection("127.0.0.1", guard["port"], timeout=60)
    connection.request("GET", f"/v1.41/containers/{container}/logs?follow=1&stdout=1&stderr=1")
    response = connection.getresponse()
    arrivals = []
    while chunk := response.read1(65536):
        arrivals.append((time.monotonic(), chunk))
    connection.close()
    text = b"".join(chunk for _, chunk in arrivals)
    assert b"first" in text and b"second" in text
    first = next(t for t, chunk in arrivals if b"first" in chunk)
    second = next(t for t, chunk in arrivals if b"second" in chunk)
    assert second - first > 2, "the log lines came together: the guard buffered the stream"
    status, waited = call(guard["port"], "POST", f"/v1.41/containers/{container}/wait")
    assert (status, waited["StatusCode"]) == (200, 0)
    assert call(guard["port"], "DELETE", f"/v1.41/containers/{container}?force=1")[0] == 204


def test_a_chunked_create_is_read_whole_and_checked(guard):
    """A chunked body is checked as a whole: an allowed one creates, a privileged one does not."""
    for privileged in (False, True):
        name = unique("chunked")
        body = json.dumps(stage_body(guard["data"], guard["results"], Privileged=privileged)).encode()
        chunks = iter([body[:40], body[40:]])
        connection = http.client.HTTPConnection("127.0.0.1", guard["port"], timeout=60)
        connection.request("POST", f"/v1.41/containers/create?name={name}", body=chunks,
                           headers={"Content-Type": "application/json"})  # an iterable: sent chunked
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        if privileged:
            assert response.status == 403 and "privileged" in answer["message"]
            assert not exists(guard["env"], "container", name)
        else:
            assert response.status == 201, answer
            assert exists(guard["env"], "container", name)  # so the "nothing created" checks can fail
            assert call(guard["port"], "DELETE", f"/v1.41/containers/{answer['Id']}?force=1")[0] == 204


def test_a_body_over_the_limit_is_refused(guard):
    name = unique("big")
    body = stage_body(guard["data"], guard["results"])
    body["Env"] = ["X=" + "x" * 70000]
    status, answer = call(guard["port"], "POST", f"/v1.41/containers/create?name={name}", body)
    assert status == 413 and "limit" in answer["message"]
    assert not exists(guard["env"], "container", name)


@pytest.mark.parametrize("change", CREATE_ESCALATIONS.values(), ids=CREATE_ESCALATIONS.keys())
def test_escalation_in_a_create_is_refused_and_nothing_is_created(guard, change):
    host_config, words = change
    host_config = json.loads(json.dumps(host_config).replace(DATA, guard["data"]).replace(RESULTS, guard["results"]))
    name = unique("esc")
    answer = call(guard["port"], "POST", f"/v1.41/containers/create?name={name}",
                  stage_body(guard["data"], guard["results"], **host_config))
    refused(answer, words)
    assert not exists(guard["env"], "container", name)


def test_an_image_outside_the_list_is_refused(guard):
    name = unique("image")
    body = {**stage_body(guard["data"], guard["results"]), "Image": "localhost/debian:bookworm"}
    refused(call(guard["port"], "POST", f"/v1.41/containers/create?name={name}", body), "helixflow images")
    assert not exists(guard["env"], "container", name)
    refused(call(guard["port"], "GET", "/v1.41/images/localhost/debian:bookworm/json"), "only the helixflow images")
    assert call(guard["port"], "GET", f"/v1.41/images/{IMAGE}/json")[0] == 200


def test_pull_build_volume_and_network_creation_are_refused(guard):
    env = guard["env"]
    refused(call(guard["port"], "POST", "/v1.41/images/create?fromImage=localhost/guard-pulled&tag=1"), "pull")
    assert not exists(env, "image", "localhost/guard-pulled:1")
    tag = unique("built")
    refused(call(guard["port"], "POST", f"/v1.41/build?t=localhost/{tag}:1", b"not a tar",
                 headers={"Content-Type": "application/x-tar"}), "build")
    assert not exists(env, "image", f"localhost/{tag}:1")
    volume, network = unique("vol"), unique("net")
    refused(call(guard["port"], "POST", "/v1.41/volumes/create", {"Name": volume}), "volume")
    assert not exists(env, "volume", volume)
    refused(call(guard["port"], "POST", "/v1.41/networks/create", {"Name": network}), "network")
    assert not exists(env, "network", network)


def test_exec_and_archive_on_a_running_stage_are_refused(guard):
    container = started_container(guard)
    try:
        refused(call(guard["port"], "POST", f"/v1.41/containers/{container}/exec",
                     {"Cmd": ["touch", "/tmp/exec-ran"], "AttachStdout": True}), "exec")
        inspected = json.loads(podman_cli(guard["env"], "inspect", container).stdout)[0]
        assert not inspected.get("ExecIDs")
        refused(call(guard["port"], "GET", f"/v1.41/containers/{container}/archive?path=/etc/shadow"), "archive")
        refused(call(guard["port"], "PUT", f"/v1.41/containers/{container}/archive?path=/tmp",
                     b"tar", headers={"Content-Type": "application/x-tar"}), "archive")
        status, _ = call(guard["port"], "HEAD", f"/v1.41/containers/{container}/archive?path=/etc")
        assert status == 403
        for target in (f"/v1.41/containers/{container}/../exec", f"/v1.41/containers/{container}%2Fexec",
                       f"/v1.41/containers//{container}/exec", f"/v1.41/containers/{container}/exec/"):
            assert call(guard["port"], "POST", target, {"Cmd": ["true"]})[0] == 403, target
        assert not json.loads(podman_cli(guard["env"], "inspect", container).stdout)[0].get("ExecIDs")
        assert podman_cli(guard["env"], "exec", container, "test", "-e", "/tmp/exec-ran").returncode == 1
    finally:
        call(guard["port"], "DELETE", f"/v1.41/containers/{container}?force=1")


def test_containers_helixflow_did_not_start_are_out_of_reach(guard):
    """A container started directly with podman (as Postgres is): no inspect (its environment holds
    secrets), start, stop, logs, attach or remove, and no entry in lists."""
    name = unique("other")
    started = podman_cli(guard["env"], "run", "-d", "--name", name, "--label", "helixflow.test=1",
                         "-e", "POSTGRES_PASSWORD=secret", IMAGE, "sleep", "120")
    assert started.returncode == 0, started.stderr
    other = started.stdout.strip()
    own = started_container(guard)
    try:
        for method, path in [("GET", "json"), ("POST", "stop"), ("POST", "kill"), ("GET", "logs?stdout=1"),
                             ("POST", "wait"), ("POST", "attach?stream=1&stdout=1")]:
            for ref in (name, other, other[:12]):
                answer = call(guard["port"], method, f"/v1.41/containers/{ref}/{path}")
                refused(answer, "not started by helixflow")
                assert "secret" not in json.dumps(answer[1])
        refused(call(guard["port"], "DELETE", f"/v1.41/containers/{name}?force=1"), "not started by helixflow")
        assert podman_cli(guard["env"], "container", "inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
        status, listed = call(guard["port"], "GET", "/v1.41/containers/json?all=1")
        assert status == 200
        ids = {c["Id"] for c in listed}
        assert own in ids and other not in ids
        status, inspected = call(guard["port"], "GET", f"/v1.41/containers/{own}/json")
        assert status == 200 and inspected["Config"]["Labels"][OWNER] == "helixflow"
        status, missing = call(guard["port"], "GET", "/v1.41/containers/guard-no-such-container/json")
        assert status == 404, missing  # the engine's own answer, as docker-py's NotFound expects
    finally:
        podman_cli(guard["env"], "rm", "-f", "-t", "0", name)
        call(guard["port"], "DELETE", f"/v1.41/containers/{own}?force=1")


def test_every_refusal_is_logged(guard):
    refused(call(guard["port"], "GET", "/v1.41/info"), "system-wide")
    assert "GET /v1.41/info HTTP/1.1 -> 403 refused" in guard["log"].read_text()


@pytest.mark.slow
def test_guard_image_serves_as_a_non_root_user_and_stops_on_sigterm(guard):
    """containers/docker-guard.Dockerfile built on the local base: it guards a socket mounted
    read-only and stops within seconds of SIGTERM (Python as PID 1 handles it)."""
    env, tag, name = guard["env"], f"localhost/{unique('image')}:1", unique("guard")
    build = subprocess.run([PROJECT_DIR / "ci" / "build-image.sh", "containers/docker-guard.Dockerfile", tag],
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        assert podman_cli(env, "image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == "2375"
        port = free_port()
        # The test socket is 0600 root: run as root, with no capabilities and a read-only root.
        started = podman_cli(env, "run", "-d", "--name", name, "--label", "helixflow.test=1", "--user", "0",
                             "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                             "-v", f"{guard['socket']}:/var/run/docker.sock:ro", "-p", f"127.0.0.1:{port}:2375",
                             "-e", f"HELIXFLOW_IMAGE={IMAGE}", "-e", f"HELIXFLOW_DATA_DIR={guard['data']}",
                             "-e", f"HELIXFLOW_RESULTS_DIR={guard['results']}", tag)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 30
        while call(port, "GET", "/_ping", fail_ok=True)[0] != 200:
            assert time.monotonic() < deadline, podman_cli(env, "logs", name).stderr
            time.sleep(0.2)
        assert call(port, "GET", f"/v1.41/images/{IMAGE}/json")[0] == 200
        refused(call(port, "POST", "/v1.41/containers/create",
                     stage_body(guard["data"], guard["results"], Privileged=True)), "privileged")
        began = time.monotonic()
        assert podman_cli(env, "stop", "-t", "30", name).returncode == 0
        assert time.monotonic() - began < 10
    finally:
        podman_cli(env, "rm", "-f", "-t", "0", name)
        podman_cli(env, "rmi", "--force", tag)
