"""A real Prometheus, Pushgateway and node-exporter on 127.0.0.1, for tests (Debian's binaries).

Prometheus runs the project's own monitoring/prometheus.yml and rules, with every scrape target
replaced by a local address (jobs without one are dropped), every credentials file by a local
file and a 1 s scrape interval::

    secrets = {credentials_file("airflow"): tmp_path / "token"}
    with PrometheusStack(tmp_path, targets={"airflow": "127.0.0.1:8080"}, secrets=secrets) as stack:
        push_to_gateway(stack.pushgateway_url, job="helixflow", registry=registry)
        stack.wait_for('helixflow_step_success{run="r1"}')
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONFIG = PROJECT_DIR / "monitoring" / "prometheus.yml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group started for ``process`` (its workers too), SIGKILL after `timeout` s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def api_get(base_url: str, path: str, params: dict | None = None, timeout: float = 10.0) -> dict:
    """GET a Prometheus HTTP API path and return its ``data``; raise on an error status."""
    url = f"{base_url}{path}?{urllib.parse.urlencode(params or {})}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def query(base_url: str, expr: str) -> list[dict]:
    """Evaluate `expr` now; one ``{"metric": labels, "value": [t, "v"]}`` per series."""
    return api_get(base_url, "/api/v1/query", {"query": expr})["result"]


def query_range(base_url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Evaluate `expr` from `start` to `end` (Unix seconds); one ``{"metric", "values"}`` per series."""
    params = {"query": expr, "start": start, "end": end, "step": step}
    return api_get(base_url, "/api/v1/query_range", params)["result"]


def credentials_file(job: str) -> str:
    """The ``authorization.credentials_file`` of scrape job `job` in monitoring/prometheus.yml (a container path)."""
    (config,) = [c for c in yaml.safe_load(CONFIG.read_text())["scrape_configs"] if c["job_name"] == job]
    return config["authorization"]["credentials_file"]


def local_config(targets: dict[str, str], rules_dir: Path, secrets: dict[str, Path] | None = None) -> dict:
    """monitoring/prometheus.yml with local targets and credentials files, absolute rule paths, a 1 s interval.

    Parameters
    ----------
    targets : dict of str to str
        Job name -> ``host:port``; jobs not named here are dropped.
    rules_dir : Path
        The folder the config's relative ``rule_files`` are resolved against.
    secrets : dict of str to Path, optional
        A ``credentials_file`` of the config (the path compose mounts it at) -> the local file to use.

    Raises
    ------
    KeyError
        When a kept job reads a credentials file that `secrets` does not map: Prometheus would
        scrape it without credentials, or not start.
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules_dir / pattern) for pattern in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in targets]
    for job in jobs:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        authorization = job.get("authorization", {})
        if "credentials_file" in authorization:
            path = authorization["credentials_file"]
            if path not in (secrets or {}):
                raise KeyError(f"scrape job {job['job_name']} reads {path}: pass a local file for it in secrets")
            authorization["credentials_file"] = str(secrets[path])
    config["scrape_configs"] = jobs
    return config


class Service:
    """One exporter or server process in its own session, stopped by process group.

    Parameters
    ----------
    name : str
        Used for its log file, ``<workdir>/<name>.log``.
    argv : list of str
        The command; it must listen on `port`.
    port : int
        Its 127.0.0.1 port.
    ready_path : str
        Polled until it answers 200 (node-exporter has no ``/-/ready``).
    """

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str = "/-/ready") -> None:
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workdir: Path, timeout: float = 30.0) -> None:
        """Start the process and wait until `ready_path` answers."""
        log = open(workdir / f"{self.name}.log", "wb")
        with log:
            self.process = subprocess.Popen(self.argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {workdir}/{self.name}.log")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready on {self.url} after {timeout} s")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process, timeout=10)


def pushgateway_service(port: int | None = None) -> Service:
    """Debian's Pushgateway on 127.0.0.1; pushes kept in memory (its default file is shared by all)."""
    port = port or free_port()
    return Service("pushgateway", ["prometheus-pushgateway", "--persistence.file=",
                                   f"--web.listen-address=127.0.0.1:{port}"], port)


class PrometheusStack:
    """Prometheus with the project's config and rules, a Pushgateway and a node-exporter.

    Parameters
    ----------
    workdir : Path
        Holds the generated config, the TSDB and the logs.
    targets : dict of str to str, optional
        More scrape jobs of monitoring/prometheus.yml -> ``host:port`` (e.g. ``"airflow"``);
        the jobs prometheus, pushgateway and node point at the processes started here.
    secrets : dict of str to Path, optional
        The config's ``credentials_file`` paths -> local files (see `local_config`), e.g. the
        airflow job's bearer token.

    Attributes
    ----------
    url, pushgateway_url, node_exporter_url : str
        ``http://127.0.0.1:<port>`` of each process.
    """

    def __init__(self, workdir: Path, targets: dict[str, str] | None = None,
                 secrets: dict[str, Path] | None = None) -> None:
        self.workdir = Path(workdir)
        self.secrets = dict(secrets or {})
        self.config = self.workdir / "prometheus.yml"
        port = {name: free_port() for name in ("prometheus", "pushgateway", "node")}
        self.pushgateway = pushgateway_service(port["pushgateway"])
        # Only the collectors behind the contract's node metrics: faster, and no host-specific noise.
        self.node = Service("node-exporter", ["prometheus-node-exporter", "--collector.disable-defaults",
                                              "--collector.cpu", "--collector.meminfo",
                                              f"--web.listen-address=127.0.0.1:{port['node']}"],
                            port["node"], ready_path="/metrics")
        self.prometheus = Service("prometheus", ["prometheus", f"--config.file={self.config}",
                                                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                                 f"--web.listen-address=127.0.0.1:{port['prometheus']}"],
                                  port["prometheus"])
        self.targets = {name: f"127.0.0.1:{number}" for name, number in port.items()} | (targets or {})

    @property
    def url(self) -> str:
        return self.prometheus.url

    @property
    def pushgateway_url(self) -> str:
        return self.pushgateway.url

    @property
    def node_exporter_url(self) -> str:
        return self.node.url

    def start(self) -> PrometheusStack:
        """Write the config, start the exporters, then Prometheus; each ready when this returns."""
        self.config.write_text(yaml.safe_dump(local_config(self.targets, CONFIG.parent, self.secrets)))
        try:
            for service in (self.pushgateway, self.node, self.prometheus):
                service.start(self.workdir)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process that was started, Prometheus first."""
        for service in (self.prometheus, self.node, self.pushgateway):
            service.stop()

    def __enter__(self) -> PrometheusStack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add_target(self, job: str, address: str, timeout: float = 30.0) -> None:
        """Point scrape job `job` of monitoring/prometheus.yml at `address` (a server started after Prometheus).

        Rewrites the config and sends SIGHUP, Prometheus's signal to reload it; returns once the
        target is listed.
        """
        self.targets[job] = address
        self.config.write_text(yaml.safe_dump(local_config(self.targets, CONFIG.parent, self.secrets)))
        os.kill(self.prometheus.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while not any(target["labels"].get("job") == job
                      for target in api_get(self.url, "/api/v1/targets")["activeTargets"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus did not load scrape job {job} (log: {self.workdir}/prometheus.log)")
            time.sleep(0.25)

    def query(self, expr: str) -> list[dict]:
        """Instant query now; see `query`."""
        return query(self.url, expr)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Range query; see `query_range`."""
        return query_range(self.url, expr, start, end, step)

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """Poll the instant query `expr` until it returns series; return them.

        Raises
        ------
        TimeoutError
            When it still returns nothing after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"no series for {expr} after {timeout} s (Prometheus logs: {self.workdir}/prometheus.log)")
