"""``helixflow_s3_inbox``: one ``helixflow`` run per new ``.h5ad`` object under an S3 prefix.

Every HELIXFLOW_S3_INBOX_SCHEDULE (default 5 minutes), ``new_objects`` lists the watched prefix
HELIXFLOW_S3_INBOX (``s3://BUCKET/PREFIX``) and hands the objects to the folder inbox's logic
(helixflow_inbox.py): an object is complete as soon as it is listed (S3 lists it only once its PUT
or multipart upload completes), and each version of it (key and ETag) starts one run, with the
id ``s3inbox__<run name>__<ETag>``; what was started is kept in
``RESULTS/.helixflow-s3-inbox/state.json``. ``start_run`` triggers the runs: input
``s3://BUCKET/PREFIX/<key>``, results under HELIXFLOW_S3_RESULTS/<run name>/ (helixflow_dag.py).

A short scheduled poll rather than a deferrable sensor: the Amazon provider's S3 sensors wait
for one key or prefix and then end, where this DAG must start a run per object and remember
which, and a poll task holds a worker slot for about a second. Without HELIXFLOW_S3_INBOX the
DAG is not defined.
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

WATCHED = os.environ.get("HELIXFLOW_S3_INBOX")
RESULTS_DIR = os.environ.get("HELIXFLOW_RESULTS_DIR", "/srv/helixflow/results")
# The DAG the runs belong to (helixflow_dag.py).
HELIXFLOW_DAG_ID = "helixflow"

if WATCHED:
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    with DAG(
        dag_id="helixflow_s3_inbox",
        description=f"Starts a helixflow run for every new .h5ad object under {WATCHED}",
        schedule=os.environ.get("HELIXFLOW_S3_INBOX_SCHEDULE", "*/5 * * * *"),
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["helixflow", "s3"],
        doc_md=__doc__,
    ):

        @task
        def new_objects(ti=None) -> list[dict]:
            """The .h5ad objects under the watched prefix whose current version has no run yet."""
            import helixflow_inbox as inbox
            from helixflow.object_storage import explained_errors, parse_s3_url, s3_client

            watched = parse_s3_url(WATCHED)
            with explained_errors(watched):
                client = s3_client()
            with explained_errors(watched, client):
                arrivals = inbox.scan_objects(client, watched.bucket, watched.key)
            state_dir = Path(RESULTS_DIR) / ".helixflow-s3-inbox"
            runs, state = inbox.poll(arrivals, inbox.read_state(state_dir), inbox.run_status_of(ti, HELIXFLOW_DAG_ID),
                                     source="s3inbox")
            inbox.write_state(state_dir, state)
            model = os.environ.get("HELIXFLOW_DEFAULT_MODEL", "tiny")
            return [{"trigger_run_id": run["run_id"],
                     "conf": {"input": str(watched.child(run["relative"])), "model": model, "run_name": run["run_name"]}}
                    for run in runs]

        # The run ids are fixed by the objects' versions: a run that exists is not started twice.
        TriggerDagRunOperator.partial(task_id="start_run", trigger_dag_id=HELIXFLOW_DAG_ID,
                                      skip_when_already_exists=True).expand_kwargs(new_objects())
