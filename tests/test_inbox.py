"""The inbox's pure logic (airflow/dags/helixflow_inbox.py): complete files only, reruns, distinct run names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from airflow_helpers import AIRFLOW, AIRFLOW_VENV, init_db, local_env, require_airflow
from conftest import PROJECT_DIR

sys.path.insert(0, str(PROJECT_DIR / "airflow" / "dags"))
import helixflow_inbox as inbox  # noqa: E402


def write(path, data: bytes, mtime_ns: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


class Runs:
    """The helixflow DAG runs the trigger started, with the states a test gives them."""

    def __init__(self):
        self.states = {}

    def status(self, run_id):
        return self.states.get(run_id)

    def poll(self, folder, state, **options):
        runs, state = inbox.poll(inbox.scan(folder), state, self.status, **options)
        for run in runs:
            self.states[run["run_id"]] = "queued"
        return runs, state


def test_a_file_starts_only_once_unchanged_across_two_polls(tmp_path):
    runs = Runs()
    write(tmp_path / "x.h5ad", b"half", mtime_ns=1_000)
    started, state = runs.poll(tmp_path, {})
    assert started == []  # first sight: may still be copied
    write(tmp_path / "x.h5ad", b"half and more", mtime_ns=2_000)
    started, state = runs.poll(tmp_path, state)
    assert started == []  # it grew
    started, state = runs.poll(tmp_path, state)
    assert started == [{"run_id": "inbox__x__13-2000", "relative": "x.h5ad", "run_name": "x"}]
    assert runs.poll(tmp_path, state)[0] == []  # a re-poll starts nothing


def test_done_marker_completes_a_file_at_once_and_can_be_required(tmp_path):
    write(tmp_path / "x.h5ad", b"data", mtime_ns=1_000)
    write(tmp_path / "y.h5ad", b"data", mtime_ns=1_000)
    (tmp_path / "x.h5ad.done").touch()
    started, state = Runs().poll(tmp_path, {})
    assert [run["relative"] for run in started] == ["x.h5ad"]
    started, _ = Runs().poll(tmp_path, state, require_done_marker=True)
    assert [run["relative"] for run in started] == ["x.h5ad"]  # y is stable but has no marker


def start_once(runs: Runs, path: Path, content: bytes) -> tuple[dict, dict]:
    """Write ``path`` and poll twice (the second poll sees it stable): its one run and the state."""
    write(path, content, mtime_ns=1_000)
    state = runs.poll(path.parent, {})[1]
    (run,), state = runs.poll(path.parent, state)
    return run, state


def test_a_failed_run_reruns_only_once_the_file_changes(tmp_path):
    runs = Runs()
    first, state = start_once(runs, tmp_path / "x.h5ad", b"bad")
    runs.states[first["run_id"]] = "failed"
    assert runs.poll(tmp_path, state)[0] == []  # same file: the same failure
    write(tmp_path / "x.h5ad", b"fixed", mtime_ns=3_000)
    state = runs.poll(tmp_path, state)[1]
    (second,), state = runs.poll(tmp_path, state)
    assert second["run_id"] == "inbox__x__5-3000" != first["run_id"] and second["run_name"] == first["run_name"]


def test_a_changed_file_waits_for_its_running_run(tmp_path):
    runs = Runs()
    first, state = start_once(runs, tmp_path / "x.h5ad", b"v1")
    runs.states[first["run_id"]] = "running"
    write(tmp_path / "x.h5ad", b"v2", mtime_ns=2_000)
    state = runs.poll(tmp_path, state)[1]
    assert runs.poll(tmp_path, state)[0] == []  # both would write results/x
    runs.states[first["run_id"]] = "success"
    assert [run["run_id"] for run in runs.poll(tmp_path, state)[0]] == ["inbox__x__2-2000"]


def test_a_trigger_that_never_happened_is_repeated_under_the_same_id(tmp_path):
    write(tmp_path / "x.h5ad", b"data", mtime_ns=1_000)
    absent = lambda run_id: None  # noqa: E731 - the start_run task failed: no such DAG run
    state = inbox.poll(inbox.scan(tmp_path), {}, absent)[1]
    (first,), state = inbox.poll(inbox.scan(tmp_path), state, absent)
    (again,), _ = inbox.poll(inbox.scan(tmp_path), state, absent)
    assert again == first


def test_same_name_in_two_folders_gives_two_runs(tmp_path):
    runs = Runs()
    for folder in ("a", "b"):
        write(tmp_path / folder / "x.h5ad", b"data", mtime_ns=1_000)
    write(tmp_path / "a-x.h5ad", b"data", mtime_ns=1_000)
    write(tmp_path / ".hidden" / "x.h5ad", b"data", mtime_ns=1_000)
    started, _ = runs.poll(tmp_path, runs.poll(tmp_path, {})[1])
    names = {run["relative"]: run["run_name"] for run in started}
    assert set(names) == {"a/x.h5ad", "b/x.h5ad", "a-x.h5ad"}
    assert len(set(names.values())) == 3 and names["a-x.h5ad"] == "a-x"
    assert names["a/x.h5ad"].startswith("a-x-") and names["b/x.h5ad"].startswith("b-x-")


@pytest.mark.parametrize("relative", ["a b.h5ad", ".x.h5ad", "deep/er/x.h5ad", "-x.h5ad", "ä/x.h5ad"])
def test_run_names_are_valid_folder_names(relative):
    name = inbox.run_name(relative)
    assert inbox.RUN_NAME.fullmatch(name) and not name.startswith((".", "-"))


def test_state_survives_between_polls_on_disk(tmp_path):
    write(tmp_path / "in" / "x.h5ad", b"data", mtime_ns=1_000)
    state_dir = tmp_path / "results" / ".helixflow-inbox"
    runs = Runs()
    inbox.write_state(state_dir, runs.poll(tmp_path / "in", inbox.read_state(state_dir))[1])
    started, _ = runs.poll(tmp_path / "in", inbox.read_state(state_dir))
    assert [run["relative"] for run in started] == ["x.h5ad"]
    assert [p.name for p in state_dir.iterdir()] == ["state.json"]


def inbox_poll(env: dict) -> None:
    """One run of the helixflow_inbox DAG, as the scheduler starts it every HELIXFLOW_INBOX_SCHEDULE."""
    done = subprocess.run([AIRFLOW, "dags", "test", "helixflow_inbox"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def helixflow_runs(env: dict) -> dict[str, dict]:
    """The helixflow DAG runs in the metadata database: run id -> conf and state."""
    code = ("import json; from airflow.models import DagRun; from airflow.utils.session import create_session\n"
            "with create_session() as session:\n"
            "    runs = session.query(DagRun).filter(DagRun.dag_id == 'helixflow').all()\n"
            "    print(json.dumps({run.run_id: {'conf': run.conf, 'state': str(run.state)} for run in runs}))")
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fail_run(env: dict, run_id: str) -> None:
    """Give a helixflow run the state a failed stage gives it (no scheduler runs it here)."""
    code = ("import sys; from airflow.models import DagRun; from airflow.utils.session import create_session\n"
            "from airflow.utils.state import DagRunState\n"
            "with create_session() as session:\n"
            "    run = session.query(DagRun).filter(DagRun.dag_id == 'helixflow', DagRun.run_id == sys.argv[1]).one()\n"
            "    run.state = DagRunState.FAILED")
    subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code, run_id], env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_inbox_dag_waits_for_complete_files_and_reruns_failed_ones(tmp_path):
    """Real Airflow: a file written slowly while the inbox polls, same-named files, a failed run."""
    require_airflow()
    data, results = tmp_path / "data", tmp_path / "results"
    env = local_env(tmp_path / "home", data, results, "helixflow", HELIXFLOW_INBOX_DIR=str(data / "inbox"))
    init_db(env)
    for folder in ("a", "b"):
        write(data / "inbox" / folder / "x.h5ad", f"cells of {folder}".encode())
    slow = data / "inbox" / "slow.h5ad"
    slow.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def append_slowly():
        with open(slow, "ab") as handle:
            while not stop.is_set():
                handle.write(b"x" * 4096)
                handle.flush()
                stop.wait(0.5)

    writer = threading.Thread(target=append_slowly)
    writer.start()
    try:
        inbox_poll(env)
        assert helixflow_runs(env) == {}  # every file is new: none known complete
        inbox_poll(env)
    finally:
        stop.set()
        writer.join()
    runs = helixflow_runs(env)
    confs = sorted((run["conf"]["input"], run["conf"]["run_name"]) for run in runs.values())
    assert [input for input, _ in confs] == ["inbox/a/x.h5ad", "inbox/b/x.h5ad"]  # slow.h5ad still grew
    assert len({name for _, name in confs}) == 2
    inbox_poll(env)  # slow.h5ad's final size, seen once
    assert len(helixflow_runs(env)) == 2
    inbox_poll(env)
    runs = helixflow_runs(env)
    stat = slow.stat()
    slow_id = f"inbox__slow__{stat.st_size}-{stat.st_mtime_ns}"
    assert slow_id in runs and len(runs) == 3
    assert runs[slow_id]["conf"] == {"input": "inbox/slow.h5ad", "model": "tiny", "run_name": "slow"}

    (a_run,) = [run_id for run_id, run in runs.items() if run["conf"]["input"] == "inbox/a/x.h5ad"]
    fail_run(env, a_run)
    inbox_poll(env)
    assert len(helixflow_runs(env)) == 3  # unchanged: not rerun
    write(data / "inbox" / "a" / "x.h5ad", b"cells of a, fixed")
    (data / "inbox" / "a" / "x.h5ad.done").touch()  # the writer says it is complete: no second poll needed
    inbox_poll(env)
    runs = helixflow_runs(env)
    (rerun,) = set(runs) - {a_run, slow_id} - {r for r, run in runs.items() if run["conf"]["input"] == "inbox/b/x.h5ad"}
    assert runs[rerun]["conf"] == runs[a_run]["conf"] and runs[a_run]["state"] == "failed"
    assert json.loads((results / ".helixflow-inbox" / "state.json").read_text())["a/x.h5ad"]["started"]["run_id"] == rerun
