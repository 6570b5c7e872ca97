"""s3:// inputs and results (helixflow.object_storage) against moto's standalone S3 server.

No S3 server binary installs here; moto[server] (a test extra) serves a real S3 HTTP API on a
free local port, started as a subprocess and stopped by PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import anndata as ad
import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig

from conftest import PROJECT_DIR, sha256
from helixflow.errors import HelixflowError
from helixflow.object_storage import MANIFEST_NAME, create_bucket, s3_client, stage_input, upload_results
from prometheus_stack import Service, free_port

TEST_CONFIG = PROJECT_DIR / ".test" / "config" / "config.yaml"
MiB = 1 << 20


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free 127.0.0.1 port; its URL. Skipped without moto (a failure under CI=true)."""
    if importlib.util.find_spec("moto") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("moto[server] is required in CI: the S3 tests run against its standalone server")
        pytest.skip("moto[server] not installed (pip install -e '.[test]'): the S3 tests need its standalone server")
    port = free_port()
    service = Service("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                      ready_path="/moto-api/")
    service.start(tmp_path_factory.mktemp("moto"))
    yield service.url
    service.stop()


@pytest.fixture
def aws_environment(s3_server, monkeypatch, tmp_path):
    """The standard AWS variables pointing at the moto server; no user's profile files or tokens."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "helixflow-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "helixflow-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture
def bucket(aws_environment) -> str:
    """A new, empty bucket for one test."""
    name = f"helixflow-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def count_calls(client, operation: str) -> list:
    """A list that grows by one each time `client` sends `operation` (e.g. GetObject)."""
    calls = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda **kwargs: calls.append(operation))
    return calls


def put_object(bucket: str, key: str, data: bytes) -> str:
    s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


@contextmanager
def credentials_checked(s3_server: str) -> Iterator[None]:
    """Make moto check credentials (it accepts any by default): no key is known to it, so every request is denied."""
    def reset_auth(count: str) -> None:
        # text/plain: a form's content type would leave moto nothing in the request's raw body.
        request = urllib.request.Request(f"{s3_server}/moto-api/reset-auth", data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    reset_auth("0")
    try:
        yield
    finally:
        reset_auth("inf")


def helixflow_run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helixflow.cli", "run", *args], capture_output=True, text=True, cwd=cwd)


# -- the cache -------------------------------------------------------------------------------


def test_a_second_stage_is_a_cache_hit_without_a_download(bucket, tmp_path, caplog):
    data = os.urandom(50_000)
    url = put_object(bucket, "in/cells.h5ad", data)
    client = s3_client()
    downloads = count_calls(client, "GetObject")
    with stage_input(url, tmp_path / "cache", max_cache_bytes=10 * MiB, client=client) as path:
        assert path.read_bytes() == data and path.name == "cells.h5ad"
    assert len(downloads) == 1
    with caplog.at_level("INFO", logger="helixflow.object_storage"):
        with stage_input(url, tmp_path / "cache", max_cache_bytes=10 * MiB, client=client) as again:
            assert again == path
    assert len(downloads) == 1 and f"cache hit: {url}" in caplog.text


def test_a_damaged_cache_entry_is_downloaded_again(bucket, tmp_path, caplog):
    data = os.urandom(50_000)
    url = put_object(bucket, "in/cells.h5ad", data)
    client = s3_client()
    downloads = count_calls(client, "GetObject")
    with stage_input(url, tmp_path / "cache", max_cache_bytes=10 * MiB, client=client) as path:
        damaged = bytearray(data)
        damaged[1000] ^= 0xFF  # same size, one byte flipped
        path.write_bytes(bytes(damaged))
    with caplog.at_level("WARNING", logger="helixflow.object_storage"):
        with stage_input(url, tmp_path / "cache", max_cache_bytes=10 * MiB, client=client) as path:
            assert path.read_bytes() == data
    assert len(downloads) == 2 and "is damaged" in caplog.text


def test_a_changed_object_is_downloaded_again(bucket, tmp_path):
    url = put_object(bucket, "in/cells.h5ad", b"first version")
    with stage_input(url, tmp_path / "cache", max_cache_bytes=MiB) as path:
        assert path.read_bytes() == b"first version"
    put_object(bucket, "in/cells.h5ad", b"second version")
    with stage_input(url, tmp_path / "cache", max_cache_bytes=MiB) as path:
        assert path.read_bytes() == b"second version"


def test_the_size_limit_evicts_the_least_recently_used(bucket, tmp_path):
    cache = tmp_path / "cache"
    urls = {name: put_object(bucket, f"in/{name}.h5ad", os.urandom(1000)) for name in "abc"}
    staged = {}
    for name in ("a", "b", "a", "c"):  # a is used again after b: b is the least recently used when c comes
        with stage_input(urls[name], cache, max_cache_bytes=2500) as path:
            staged[name] = path
    assert staged["a"].is_file() and staged["c"].is_file() and not staged["b"].exists()
    assert sum(path.stat().st_size for path in cache.rglob("*") if path.is_file()) <= 2500


def test_an_entry_in_use_is_not_evicted(bucket, tmp_path):
    cache = tmp_path / "cache"
    first, second = (put_object(bucket, f"in/{name}.h5ad", os.urandom(1000)) for name in "ab")
    with stage_input(first, cache, max_cache_bytes=1500) as in_use:
        with stage_input(second, cache, max_cache_bytes=1500) as other:
            assert in_use.is_file() and other.is_file()


def test_an_object_larger_than_the_cache_is_refused(bucket, tmp_path):
    url = put_object(bucket, "in/big.h5ad", os.urandom(2000))
    with pytest.raises(HelixflowError, match="larger than the S3 cache's limit") as error:
        with stage_input(url, tmp_path / "cache", max_cache_bytes=1000):
            pass
    assert error.value.path == url


# -- errors name the URL -------------------------------------------------------------------


def test_a_missing_object_or_bucket_names_the_url(bucket, tmp_path):
    for url, problem in ((f"s3://{bucket}/in/missing.h5ad", "no such object"),
                         (f"s3://{bucket}-missing/in/cells.h5ad", "no such bucket")):
        with pytest.raises(HelixflowError, match=problem) as error:
            with stage_input(url, tmp_path / "cache", max_cache_bytes=MiB):
                pass
        assert error.value.path == url
    with pytest.raises(HelixflowError, match="no such bucket") as error:
        upload_results(tmp_path, f"s3://{bucket}-missing/results")
    assert error.value.path == f"s3://{bucket}-missing/results"


def test_wrong_credentials_name_the_url_and_not_the_secret(aws_environment, bucket, tmp_path):
    url = f"s3://{bucket}/in/cells.h5ad"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.txt").write_text("a")
    with credentials_checked(aws_environment):
        with pytest.raises(HelixflowError, match="access denied") as error:
            with stage_input(url, tmp_path / "cache", max_cache_bytes=MiB):
                pass
        assert error.value.path == url and "helixflow-test-secret" not in str(error.value)
        with pytest.raises(HelixflowError, match="access denied") as error:
            upload_results(tmp_path / "results", f"s3://{bucket}/results")
        assert error.value.path == f"s3://{bucket}/results"


def test_no_credentials_at_all_is_a_clear_error(bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(HelixflowError, match="no AWS credentials found"):
        with stage_input(f"s3://{bucket}/in/cells.h5ad", tmp_path / "cache", max_cache_bytes=MiB):
            pass


def test_helixflow_run_reports_s3_errors_with_the_url(aws_environment, bucket, tmp_path):
    url = f"s3://{bucket}/in/missing.h5ad"
    options = ["--out", str(tmp_path / "o"), "--s3-cache", str(tmp_path / "cache")]
    missing = helixflow_run(url, *options, cwd=tmp_path)
    with credentials_checked(aws_environment):
        denied = helixflow_run(url, *options, cwd=tmp_path)
    for result, problem in ((missing, "no such object"), (denied, "access denied (403)")):
        assert result.returncode == 2
        assert f"helixflow: error: {url}: {problem}" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "helixflow-test-secret" not in result.stderr


# -- results -------------------------------------------------------------------------------


def test_results_upload_multipart_files_and_the_manifest_last(bucket, tmp_path):
    results = tmp_path / "results"
    (results / "embeddings").mkdir(parents=True)
    big = os.urandom(11 * MiB)
    (results / "embeddings" / "big.h5ad").write_bytes(big)
    (results / "small.json").write_text("{}")
    client = s3_client()
    calls = []
    client.meta.events.register("before-parameter-build.s3", lambda model, params, **kwargs: calls.append((model.name, params.get("Key"))))
    multipart = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    manifest = upload_results(results, f"s3://{bucket}/runs/r1", client=client, transfer_config=multipart)

    assert calls[0] == ("DeleteObject", "runs/r1/_SUCCESS") and calls[-1] == ("PutObject", "runs/r1/_SUCCESS")
    assert ("CompleteMultipartUpload", "runs/r1/embeddings/big.h5ad") in calls
    head = client.head_object(Bucket=bucket, Key="runs/r1/embeddings/big.h5ad")
    assert head["ETag"].strip('"').endswith("-3")  # 11 MiB in 5 MiB parts
    stored = json.loads(client.get_object(Bucket=bucket, Key=f"runs/r1/{MANIFEST_NAME}")["Body"].read())
    assert stored == manifest
    assert {entry["path"]: entry["size"] for entry in manifest["files"]} == {"embeddings/big.h5ad": 11 * MiB, "small.json": 2}
    assert manifest["files"][0]["sha256"] == sha256(results / "embeddings" / "big.h5ad")


def test_upload_leaves_out_skipped_files_and_folders(bucket, tmp_path):
    """A run folder of the Airflow stages holds snakemake's state and the staged input: not results."""
    for relative in ("report.html", ".helixflow-run.lock", ".snakemake/log/x.log", ".s3-cache/entry/cells.h5ad"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    manifest = upload_results(tmp_path, f"s3://{bucket}/runs/r2", skip=frozenset({".helixflow-run.lock", ".snakemake", ".s3-cache"}))
    assert [entry["path"] for entry in manifest["files"]] == ["report.html"]
    keys = {item["Key"] for item in s3_client().list_objects_v2(Bucket=bucket, Prefix="runs/r2/")["Contents"]}
    assert keys == {"runs/r2/report.html", f"runs/r2/{MANIFEST_NAME}"}


def test_create_bucket_creates_it_once(aws_environment):
    name = f"helixflow-{uuid.uuid4().hex[:12]}"
    assert create_bucket(f"s3://{name}/inbox") is True
    assert create_bucket(f"s3://{name}/results") is False  # the compose init runs at every start
    assert name in {entry["Name"] for entry in s3_client().list_buckets()["Buckets"]}


@pytest.mark.slow
def test_a_run_from_and_to_s3_equals_the_local_run(bucket, dataset, models_dir, tmp_path):
    """The .test configuration (600 cells, 3 chunks, the tiny model) up to the embeddings."""
    common = ["--configfile", str(TEST_CONFIG), "--models-dir", str(models_dir), "--cores", "2", "--until", "embed"]
    local = helixflow_run(str(dataset), "--out", str(tmp_path / "local"), *common, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]

    client = s3_client()
    client.upload_file(str(dataset), bucket, "data/cells.h5ad")
    from_s3 = helixflow_run(f"s3://{bucket}/data/cells.h5ad", "--out", f"s3://{bucket}/results/run",
                            "--s3-cache", str(tmp_path / "cache"), *common, cwd=tmp_path)
    assert from_s3.returncode == 0, from_s3.stderr[-3000:]
    assert "uploaded" in from_s3.stderr and "verified s3://" in from_s3.stderr

    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"results/run/{MANIFEST_NAME}")["Body"].read())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="results/run/")["Contents"]}
    assert keys == {f"results/run/{path}" for path in listed} | {f"results/run/{MANIFEST_NAME}"}
    assert set(listed) == {path.relative_to(tmp_path / "local").as_posix()
                           for path in (tmp_path / "local").rglob("*") if path.is_file() and path.name != ".helixflow-run.lock"}
    for name in ("tokens/chunk-00000.arrow", "tokens/chunk-00001.arrow", "tokens/chunk-00002.arrow",
                 "embeddings/embeddings.h5ad"):
        client.download_file(bucket, f"results/run/{name}", str(tmp_path / "downloaded"))
        assert sha256(tmp_path / "downloaded") == listed[name]["sha256"]
        if name.endswith(".arrow"):
            assert listed[name]["sha256"] == sha256(tmp_path / "local" / name), name
    embeddings = ad.read_h5ad(tmp_path / "downloaded")
    expected = ad.read_h5ad(tmp_path / "local" / "embeddings" / "embeddings.h5ad")
    np.testing.assert_allclose(embeddings.obsm["X_geneformer"], expected.obsm["X_geneformer"], rtol=1e-5, atol=1e-6)
    assert embeddings.obs.equals(expected.obs)
