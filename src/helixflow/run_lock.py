"""One run per output folder, and no manual step after a killed run.

``helixflow run`` holds an exclusive ``flock`` on ``OUTDIR/.helixflow-run.lock`` while it runs
(snakemake inherits the open file, so the lock lasts as long as either lives). The kernel
releases the lock when its holders die, ``kill -9`` and a killed container included, so a lock
that can be taken is by definition not held by a live run; the file's text (PID, host, start
time, command) only names the holder in the refusal message. ``flock`` works across working
directories, containers on one host and NFS clients (Linux emulates it with NFS byte-range locks).

Snakemake's own locks (``WORKDIR/.snakemake/locks/N.{input,output}.lock``, lists of paths) stay
behind after a kill and make the next run fail until ``--unlock``. While holding the folder's
lock, the lock files naming paths in that folder can only come from a dead run, unless a plain
``snakemake`` (started without helixflow) works in the same working directory:
:func:`clear_stale_snakemake_locks` removes them, and leaves them when such a process is alive.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from helixflow.errors import HelixflowError

LOCK_NAME = ".helixflow-run.lock"
# Set in snakemake's environment (and so its jobs'): which folder lock a process belongs to.
LOCK_ENV = "HELIXFLOW_RUN_LOCK"

log = logging.getLogger(__name__)


@dataclass
class Holder:
    """Who holds (or last held) an output folder's lock."""

    pid: int
    host: str
    started: str
    command: str
    workdir: str
    snakemake_pid: int | None = None

    def describe(self) -> str:
        snakemake = f", snakemake PID {self.snakemake_pid}" if self.snakemake_pid else ""
        return f"PID {self.pid}{snakemake} on host {self.host}, started {self.started}, in {self.workdir}: {self.command}"


class OutputFolderInUse(HelixflowError):
    """Another live run holds the output folder."""

    exit_code = 75  # EX_TEMPFAIL: try again once the other run has finished


class RunLock:
    """An exclusive lock on an output folder for the lifetime of one run.

    Parameters
    ----------
    outdir
        The run's output folder (created if missing).
    command
        The command line recorded for the refusal message of a second run.

    Attributes
    ----------
    interrupted
        The holder record left by an earlier run that did not end cleanly (killed), or ``None``.
    """

    def __init__(self, outdir: str | Path, command: str) -> None:
        self.path = Path(outdir) / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.interrupted: Holder | None = None
        self.holder: Holder | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`OutputFolderInUse` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = holder.describe() if holder else "a run that is starting"
                raise OutputFolderInUse(self.path.parent, f"another helixflow run is using this output folder ({who}); "
                                        "wait for it to finish or stop it, or choose another --out") from None
            except OSError as error:
                os.close(fd)
                raise HelixflowError(self.path, f"cannot lock the output folder ({error.strerror}); "
                                     "its file system does not support file locks") from None
            # A lock file replaced between our open and flock is not the one others lock: retry.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        self.interrupted = _read_holder(fd)
        self.holder = Holder(pid=os.getpid(), host=socket.gethostname(),
                             started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                             command=self.command, workdir=os.getcwd())
        self._write()
        return self

    def record_snakemake(self, pid: int) -> None:
        """Name snakemake's PID in the record (it shares the lock through the inherited file)."""
        self.holder.snakemake_pid = pid
        self._write()

    def release(self) -> None:
        """Empty the record (a clean end) and drop the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _write(self) -> None:
        text = json.dumps(asdict(self.holder)).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)
        os.fsync(self.fd)


def _read_holder(fd: int) -> Holder | None:
    text = os.pread(fd, 65536, 0)
    if not text.strip():
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return None


def clear_stale_snakemake_locks(workdir: str | Path, outdir: str | Path) -> list[Path]:
    """Remove Snakemake lock files of ``workdir`` that name paths inside ``outdir``.

    Call only while holding ``outdir``'s :class:`RunLock`: then no helixflow run on ``outdir``
    is alive, and such lock files were left by a killed one. A live ``snakemake`` of this host
    working in ``workdir`` without a helixflow lock may own them: then nothing is removed (and
    snakemake reports its lock as usual).

    Returns
    -------
    list of Path
        The lock files removed.
    """
    workdir = Path(workdir).resolve()
    outdir = Path(outdir).resolve()
    lock_files = sorted((workdir / ".snakemake" / "locks").glob("*.lock"))
    stale = [path for path in lock_files if _names_path_in(path, workdir, outdir)]
    if not stale:
        return []
    plain = _plain_snakemake_processes(workdir)
    if plain:
        log.warning("left Snakemake's locks in %s: snakemake PID %s works there without helixflow",
                    workdir / ".snakemake" / "locks", ", ".join(map(str, plain)))
        return []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _names_path_in(lock_file: Path, workdir: Path, outdir: Path) -> bool:
    try:
        keys = lock_file.read_text().splitlines()
    except FileNotFoundError:
        return False
    for key in filter(None, map(str.strip, keys)):
        path = Path(os.path.normpath(workdir / key))  # keys are relative to the working directory, or absolute
        if path == outdir or outdir in path.parents:
            return True
    return False


def _plain_snakemake_processes(workdir: Path) -> list[int]:
    """PIDs of this host's snakemake processes in ``workdir`` that no helixflow run started."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.pid == os.getpid() or not any(Path(part).name == "snakemake" for part in cmdline):
            continue
        try:
            if Path(process.cwd()).resolve() != workdir:
                continue
            if LOCK_ENV in process.environ():
                continue
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            pass  # cannot tell: treat it as a plain snakemake
        found.append(process.pid)
    return found
