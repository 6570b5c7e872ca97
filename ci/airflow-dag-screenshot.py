"""Screenshot of a DAG's graph in the Airflow 3 UI with headless Chromium (Playwright).

Usage: python ci/airflow-dag-screenshot.py BASE_URL DAG_ID OUT.png
Logs in through the simple auth manager's all-admins login (AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS),
selects the graph view (the UI keeps it in localStorage) and waits for the task nodes.
Run with the Airflow environment's python; the browser is Debian's chromium (HELIXFLOW_CHROMIUM).
"""

import os
import sys

from playwright.sync_api import sync_playwright

base, dag_id, out = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
chromium = os.environ.get("HELIXFLOW_CHROMIUM", "/usr/bin/chromium")
with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
        executable_path=chromium, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--no-first-run"])
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    page.goto(f"{base}/auth/token/login?next={base}/dags", wait_until="networkidle")
    page.evaluate("window.localStorage.setItem('default_dag_view', JSON.stringify('graph'))")
    page.goto(f"{base}/dags/{dag_id}", wait_until="networkidle")
    page.get_by_text("tokenize", exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(2_000)
    page.screenshot(path=out)
    browser.close()
print(out)
