"""What this machine (or the container or cgroup it runs in) gives local runs: memory."""

from __future__ import annotations

from pathlib import Path

# Left for snakemake itself and the system; an Airflow stage container gets its step's budget
# plus this much (airflow/dags/helixflow_dag.py, stage_limits), so the step's jobs fit exactly.
SNAKEMAKE_RESERVE_MB = 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")


def machine_memory_mb() -> int:
    """Memory in MiB: the smaller of the machine's (``/proc/meminfo``) and the cgroup limit."""
    limits = [_meminfo_total_mb()]
    limits += _cgroup_limits_mb()
    return min(limits)


def jobs_memory_mb() -> int:
    """Memory the jobs of a local run may use at once: the machine's less what snakemake needs."""
    total = machine_memory_mb()
    return max(total - SNAKEMAKE_RESERVE_MB, total // 2)


def _meminfo_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def _cgroup_limits_mb() -> list[int]:
    """Memory limits of this process's cgroup and its ancestors (v1 and v2 hierarchies)."""
    limits = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 unified hierarchy
            base, name = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified", "memory.max"
        elif "memory" in controllers.split(","):
            base, name = CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        for candidate in [folder, *folder.parents]:
            if candidate == base.parent:
                break
            limit = _read_limit(candidate / name)
            if limit is not None:
                limits.append(limit)
    return limits


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    limit = int(text) // (1024 * 1024)
    return limit if limit < 1 << 40 else None  # v1 writes "no limit" as a huge number
