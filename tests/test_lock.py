"""requirements/helixflow.lock (what `make venv` installs, written by `make lock`): one pinned line
with a SHA-256 per distribution, no local paths, and the same versions as the pins of
pyproject.toml, the Makefile's relock and the images' build args, so a changed pin without a new
lock fails here rather than on the next machine."""

from __future__ import annotations

import re
import tomllib

import pytest

from conftest import PROJECT_DIR

LOCK = PROJECT_DIR / "requirements" / "helixflow.lock"
LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) --hash=sha256:[0-9a-f]{64}")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    """canonical name -> version; every line that is not a comment must be a hashed pin."""
    versions = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = LINE.fullmatch(line)
        assert m, f"{LOCK.name}:{number}: not NAME==VERSION --hash=sha256:HASH: {line!r}"
        assert canonical(m[1]) not in versions, f"{LOCK.name}:{number}: {m[1]} twice"
        versions[canonical(m[1])] = m[2]
    return versions


def test_every_line_is_a_pin_with_its_hash_sorted_and_without_local_paths():
    versions = locked()
    assert len(versions) > 100
    assert list(versions) == sorted(versions)
    # helixflow itself is installed from the checkout, not from the lock
    assert "helixflow" not in versions
    assert versions["torch"].endswith("+cpu"), "torch must be the CPU build"
    assert {"pip", "setuptools"} <= versions.keys()
    text = LOCK.read_text()
    for local in ("file:", "/opt/", "/work/", "/tmp/", "/root/", "/home/"):
        assert local not in text


def pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for requirement in requirements:
        if m := re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)", requirement.strip()):
            out[canonical(m[1])] = m[2]
    return out


def test_the_lock_has_the_versions_pinned_elsewhere():
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
    expected = {"pyproject.toml": pins(project["dependencies"] + project["optional-dependencies"]["test"])}
    makefile = (PROJECT_DIR / "Makefile").read_text()
    relock = makefile[makefile.index("\nrelock:"):].split("\n\n")[0]
    expected["Makefile relock"] = pins(re.findall(r"\s(\S+==\S+)$", relock, re.MULTILINE))
    images = {"TORCH": "torch", "HELICAL": "helical", "DEEPSPEED": "deepspeed",
              "SLURM_PLUGIN": "snakemake-executor-plugin-slurm"}
    for dockerfile in ("helixflow.Dockerfile", "helixflow-gpu.Dockerfile"):
        text = (PROJECT_DIR / "containers" / dockerfile).read_text()
        args = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", text, re.MULTILINE))
        expected[dockerfile] = {images[arg]: version for arg, version in args.items()}
        expected[dockerfile] |= pins(re.findall(r"\b((?:pip|setuptools)==[0-9][0-9A-Za-z.+!]*)", text))
        assert set(expected[dockerfile]) == set(images.values()) | {"pip", "setuptools"}, dockerfile
    versions = locked()
    assert expected["pyproject.toml"] and expected["Makefile relock"]
    for source, wanted in expected.items():
        for name, version in wanted.items():
            assert name in versions, f"{name} ({source}) is not in {LOCK.name}: make lock"
            # torch==2.13.0 is satisfied by the lock's 2.13.0+cpu (a local version label)
            assert versions[name].split("+")[0] == version, \
                f"{source} pins {name}=={version}, {LOCK.name} has {versions[name]}: make lock"


@pytest.mark.parametrize("filename, glibc", [
    ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", (2, 28)),
    ("numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", (2, 17)),
    ("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl", (2, 12)),
    ("six-1.17.0-py2.py3-none-any.whl", None),
    ("deepspeed-0.19.8.tar.gz", None),
])
def test_the_lock_header_names_the_glibc_the_wheels_need(filename, glibc):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", PROJECT_DIR / "ci" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    assert lock.wheel_glibc(filename) == glibc
