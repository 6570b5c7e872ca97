"""The S3 inbox's poll (airflow/dags/helixflow_s3_inbox.py) against moto's standalone S3 server.

The listing is the real S3 API's (tests/test_object_storage.py starts the server); the decisions
are the folder inbox's logic (helixflow_inbox.poll), with the runs' states given by the test.
"""

from __future__ import annotations

import sys

from conftest import PROJECT_DIR
from helixflow.object_storage import s3_client
from test_object_storage import aws_environment, bucket, s3_server  # noqa: F401 - fixtures

sys.path.insert(0, str(PROJECT_DIR / "airflow" / "dags"))
import helixflow_inbox as inbox  # noqa: E402


class Runs:
    """The helixflow DAG runs the S3 inbox started, with the states a test gives them."""

    def __init__(self, bucket_name: str):
        self.bucket = bucket_name
        self.states = {}

    def poll(self, state: dict) -> tuple[list[dict], dict]:
        arrivals = inbox.scan_objects(s3_client(), self.bucket, "inbox")
        runs, state = inbox.poll(arrivals, state, self.states.get, source="s3inbox")
        for run in runs:
            self.states[run["run_id"]] = "queued"
        return runs, state


def test_an_object_starts_one_run_once_its_multipart_upload_completes(bucket):  # noqa: F811
    client = s3_client()
    upload = client.create_multipart_upload(Bucket=bucket, Key="inbox/batch/cells.h5ad")
    part = client.upload_part(Bucket=bucket, Key="inbox/batch/cells.h5ad", UploadId=upload["UploadId"], PartNumber=1,
                              Body=b"cells")
    runs = Runs(bucket)
    started, state = runs.poll({})
    assert started == []  # not listed while the upload is open
    client.complete_multipart_upload(Bucket=bucket, Key="inbox/batch/cells.h5ad", UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    etag = client.head_object(Bucket=bucket, Key="inbox/batch/cells.h5ad")["ETag"].strip('"')
    (run,), state = runs.poll(state)  # complete at first sight: no second poll needed
    name = inbox.run_name("batch/cells.h5ad")
    assert run == {"run_id": f"s3inbox__{name}__{etag}", "relative": "batch/cells.h5ad", "run_name": name}
    assert etag.endswith("-1") and name.startswith("batch-cells-")
    assert runs.poll(state)[0] == []  # a re-poll starts nothing


def test_only_h5ad_objects_under_the_prefix_and_not_hidden(bucket):  # noqa: F811
    client = s3_client()
    for key in ("inbox/x.h5ad", "inbox/notes.txt", "inbox/.partial/y.h5ad", "elsewhere/z.h5ad", "inbox-old/w.h5ad"):
        client.put_object(Bucket=bucket, Key=key, Body=b"data")
    started, _ = Runs(bucket).poll({})
    assert [run["relative"] for run in started] == ["x.h5ad"]


def test_a_new_version_of_an_object_starts_a_new_run_after_the_first_ends(bucket):  # noqa: F811
    client = s3_client()
    client.put_object(Bucket=bucket, Key="inbox/x.h5ad", Body=b"v1")
    runs = Runs(bucket)
    (first,), state = runs.poll({})
    runs.states[first["run_id"]] = "running"
    client.put_object(Bucket=bucket, Key="inbox/x.h5ad", Body=b"v2")
    started, state = runs.poll(state)
    assert started == []  # both would write results/x
    runs.states[first["run_id"]] = "failed"
    (second,), state = runs.poll(state)
    assert second["run_name"] == first["run_name"] == "x" and second["run_id"] != first["run_id"]
    runs.states[second["run_id"]] = "failed"
    assert runs.poll(state)[0] == []  # the same version's failure is not retried by the inbox
