"""The Airflow 3 web UI in headless Chromium (Playwright driving Debian's chromium), as a user uses it.

    with browser() as page:
        login(page, base_url, "admin", password)
        trigger(page, base_url, "helixflow", {"input": "cells.h5ad", "run_name": "ui"})

Run with the Airflow environment's python (Playwright lives there); the browser is
HELIXFLOW_CHROMIUM (default /usr/bin/chromium). Waits are for elements, never fixed sleeps,
with timeouts far above what a loaded 2-core machine needs.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError, Page, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 180_000


@contextlib.contextmanager
def browser() -> Iterator[Page]:
    """A page of a fresh headless Chromium, closed afterwards."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=os.environ.get("HELIXFLOW_CHROMIUM", "/usr/bin/chromium"),
                                              headless=True, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1500, "height": 950})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            chromium.close()


def login(page: Page, base_url: str, username: str, password: str) -> None:
    """Sign in on the simple auth manager's login form; returns once the home page shows."""
    page.goto(f"{base_url}/")
    page.locator("input[name=username]").fill(username)
    page.locator("input[name=password]").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Dags").first.wait_for()


def dag_list(page: Page, base_url: str, dag_id: str, shot: Path | None = None) -> None:
    """The DAG list, filtered by the search box to `dag_id`; waits until its link shows."""
    page.goto(f"{base_url}/dags")
    page.get_by_placeholder("Search Dags").first.fill(dag_id)
    page.get_by_role("link", name=dag_id, exact=True).first.wait_for()
    if shot:
        page.screenshot(path=shot)


class FormNotReady(Exception):
    """The trigger form did not open, or a field did not keep what was typed."""


def trigger(page: Page, base_url: str, dag_id: str, params: dict[str, str], shot: Path | None = None,
            unpause: bool = True) -> None:
    """Open the DAG from the list, fill the trigger form's text params and trigger a run.

    A form that does not open or does not keep a typed value (seen on a loaded machine right
    after the services start) is closed and the page loaded again, as a user would, until
    TIMEOUT_MS has passed.

    Parameters
    ----------
    params : dict
        Param name -> text typed into its field (text and number fields of the form).
    shot : Path, optional
        A screenshot of the filled form.
    unpause : bool
        Leave "Unpause on trigger" ticked (the default) or untick it.
    """
    dag_list(page, base_url, dag_id)
    page.get_by_role("link", name=dag_id, exact=True).first.click()
    page.wait_for_function("path => window.location.pathname.endsWith(path)", arg=f"/dags/{dag_id}")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        try:
            fill_trigger_form(page, dag_id, params, unpause)
            break
        except (FormNotReady, PlaywrightError) as error:
            assert time.monotonic() < deadline, f"the trigger form of {dag_id}: {error}"
            page.goto(f"{base_url}/dags/{dag_id}")
    submit = page.get_by_test_id("trigger-dag-submit")
    if shot:
        page.screenshot(path=shot, full_page=True)
    submit.click()
    submit.wait_for(state="detached")


def fill_trigger_form(page: Page, dag_id: str, params: dict[str, str], unpause: bool) -> None:
    """One try: open the trigger form on the DAG's page and type each param; FormNotReady if it fails."""
    page.get_by_test_id("trigger-dag-button").first.click(timeout=30_000)
    try:
        page.locator("input[name=element_input]").first.wait_for(timeout=30_000)
    except PlaywrightError:
        raise FormNotReady("the form did not open") from None
    for name, value in params.items():
        field = page.locator(f"input[name=element_{name}]").first
        for _ in range(10):  # the form renders again once the DAG's details arrive
            with contextlib.suppress(PlaywrightError):
                field.fill(str(value), timeout=5_000)
                page.wait_for_timeout(500)  # one render later: is the value still there?
                if field.input_value(timeout=5_000) == str(value):
                    break
        else:
            raise FormNotReady(f"the {name} field does not keep {value!r}")
    if not unpause:
        page.get_by_text(f"Unpause {dag_id} on trigger").click()
    page.get_by_test_id("trigger-dag-submit").wait_for(timeout=30_000)


def run_graph(page: Page, base_url: str, dag_id: str, run_id: str, task_ids: list[str], shot: Path) -> None:
    """A finished run's graph: the graph view (kept in localStorage), every task node shown."""
    page.evaluate("window.localStorage.setItem('default_dag_view', JSON.stringify('graph'))")
    page.goto(f"{base_url}/dags/{dag_id}/runs/{run_id}")
    for task_id in task_ids:
        page.get_by_text(task_id, exact=True).first.wait_for()
    page.screenshot(path=shot)


# Scrolls every scrollable element of the page: "top" to its start, "down" by half its height;
# returns how many moved.
SCROLL_JS = """direction => {
    let moved = 0;
    for (const box of document.querySelectorAll("*")) {
        const style = getComputedStyle(box).overflowY;
        if (box.scrollHeight <= box.clientHeight + 1 || !["auto", "scroll"].includes(style)) continue;
        const before = box.scrollTop;
        box.scrollTop = direction === "top" ? 0 : before + box.clientHeight / 2;
        if (box.scrollTop !== before) moved++;
    }
    return moved;
}"""
LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]")  # a log line's time stamp


def task_log(page: Page, base_url: str, dag_id: str, run_id: str, task_id: str, expect: str) -> str:
    """The task instance's log as the UI shows it, once `expect` is in sight; the page's text.

    The log view renders only the lines in sight (a virtual list, scrolled to the end of a long
    log), so it is scrolled from its start down, half a screen at a time, until `expect` shows;
    at the end it starts again from the top, as the log may still be arriving (a loaded machine).
    """
    page.goto(f"{base_url}/dags/{dag_id}/runs/{run_id}/tasks/{task_id}")
    page.get_by_text(LOG_LINE).first.wait_for()
    found = page.get_by_text(expect).first
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    page.evaluate(SCROLL_JS, "top")
    while not found.is_visible():
        assert time.monotonic() < deadline, f"{expect!r} is not in the UI's log of {task_id} in {run_id}"
        if not page.evaluate(SCROLL_JS, "down"):
            page.wait_for_timeout(1000)
            page.evaluate(SCROLL_JS, "top")
        page.wait_for_timeout(200)
    return page.locator("body").inner_text()
