"""Object storage (S3): stage an input object into a local, verified cache; upload a run's results.

Design
------
The workflow reads its input many times (validate, one split job per chunk, the label split),
with h5py and many small reads. Ranged reads through an S3 file object would turn each of
those into many HTTP requests, so the input is staged once instead:

* **Staging.** ``stage_input`` copies ``s3://bucket/key`` into a local cache, keyed by what
  identifies the object's content (bucket, key, version id, ETag and size, from one HEAD
  request). boto3's managed transfer downloads it (parallel ranged GETs for a large object);
  its SHA-256 is then computed and compared with the object's own checksums where S3 has one
  that a whole-file digest can match (a full-object SHA-256 or CRC32, the MD5 ETag of a
  single-part, non-KMS upload). A cache hit costs one HEAD request and a local re-read that
  checks the recorded SHA-256, so a damaged entry is downloaded again. One lock file serialises staging:
  two runs never download the same object twice. The cache has a size limit; the least
  recently used entries go first, except those a running ``helixflow run`` holds (a shared
  ``flock`` on the entry while the workflow reads it).
* **Running.** The workflow runs on the local copy, into a local work folder.
* **Results.** ``upload_results`` uploads every file to its final key (an S3 object appears
  only when its PUT or CompleteMultipartUpload finishes; boto3 switches to a multipart upload
  above its threshold), then writes the manifest ``_SUCCESS`` last: every file's path, size
  and SHA-256. Readers (and the Airflow sensor) wait for ``_SUCCESS``; a rerun into the same
  prefix deletes the old one before it uploads anything.

Snakemake's S3 storage plugin was not used: see "Object storage (S3)" in docs/workflow.md.

Credentials, region and endpoint come from boto3's own sources only: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_PROFILE with ~/.aws/config and credentials,
AWS_DEFAULT_REGION or AWS_REGION, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from helixflow.errors import HelixflowError

log = logging.getLogger(__name__)

SCHEME = "s3://"
MANIFEST_NAME = "_SUCCESS"
ENTRY_RECORD = "entry.json"
# Defaults of `helixflow run --s3-cache` and `--s3-cache-max-gb`; a container or DAG sets the variables.
DEFAULT_CACHE_DIR = Path(os.environ.get("HELIXFLOW_S3_CACHE")
                         or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "helixflow" / "s3")
DEFAULT_CACHE_MAX_GB = float(os.environ.get("HELIXFLOW_S3_CACHE_MAX_GB", 100))
# A single-part upload's ETag is the MD5 of its content; a multipart one ends in "-<parts>".
MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "InvalidClientTokenId"}
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class S3Url:
    """An ``s3://bucket/key`` address; `key` may be a prefix (a results folder)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, relative: str) -> S3Url:
        """The address of `relative` (a POSIX path) under this prefix."""
        return S3Url(self.bucket, f"{self.key.rstrip('/')}/{relative}" if self.key else relative)


def is_s3_url(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_s3_url(text: str) -> S3Url:
    """Split ``s3://bucket/key`` into its bucket and key; a bad address is a `HelixflowError`."""
    bucket, _, key = text.removeprefix(SCHEME).partition("/")
    if not is_s3_url(text) or not bucket:
        raise HelixflowError(text, "not an S3 address: expected s3://BUCKET/KEY")
    return S3Url(bucket, key.strip("/"))


def path_or_s3_url(text: str) -> Path | str:
    """An argparse type: an ``s3://`` address stays a string (``Path`` would fold its ``//``)."""
    return text if is_s3_url(text) else Path(text)


def s3_client():
    """A boto3 S3 client configured only from the standard AWS environment and profile files.

    AWS_REGION is honoured too, before AWS_DEFAULT_REGION as in the AWS CLI (boto3 reads only the latter);
    the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) is read by boto3 itself.
    """
    import boto3

    return boto3.session.Session().client("s3", region_name=os.environ.get("AWS_REGION") or None)


@contextmanager
def explained_errors(url: S3Url, client=None) -> Iterator[None]:
    """Turn boto3's exceptions into a `HelixflowError` naming `url`, never the credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound

    try:
        yield
    except NoCredentialsError:
        raise HelixflowError(url, "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                  "or AWS_PROFILE naming a profile of ~/.aws/config") from None
    except ProfileNotFound as error:
        raise HelixflowError(url, f"AWS profile {error.kwargs['profile']!r} (AWS_PROFILE) is not in ~/.aws/config") from None
    except ClientError as error:
        raise HelixflowError(url, _client_error_problem(error, url, client)) from None
    except BotoCoreError as error:  # no endpoint, a broken connection, a bad setting
        raise HelixflowError(url, f"S3 request failed: {error}") from None


def _client_error_problem(error, url: S3Url, client) -> str:
    code = error.response.get("Error", {}).get("Code", "")
    if code in DENIED_CODES:
        return (f"access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE) and that they may read and write this bucket")
    if code == "NoSuchBucket" or (code in MISSING_CODES and client is not None and not _bucket_exists(client, url)):
        return f"no such bucket {url.bucket!r}"
    if code in MISSING_CODES:
        return "no such object"
    return f"S3 error {code}: {error.response.get('Error', {}).get('Message', '')}".rstrip(": ")


def _bucket_exists(client, url: S3Url) -> bool:
    """Whether HEAD on the bucket answers, which tells a missing bucket from a missing object (both 404 on HEAD)."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=url.bucket)
    except ClientError as error:
        return error.response.get("Error", {}).get("Code") not in MISSING_CODES | {"NoSuchBucket"}
    return True


# -- staging an input ------------------------------------------------------------------------


@contextmanager
def stage_input(url: str, cache_dir: Path, *, max_cache_bytes: int, client=None) -> Iterator[Path]:
    """Yield a verified local copy of the object at `url`, from the cache or downloaded into it.

    While the ``with`` block runs, the entry holds a shared lock, so that other runs'
    eviction leaves it alone.

    Parameters
    ----------
    url
        ``s3://bucket/key`` of the object.
    cache_dir
        The cache folder (created if missing).
    max_cache_bytes
        The cache's size limit; least recently used entries are removed to stay within it.
    client
        A boto3 S3 client; default: `s3_client()`.
    """
    address = parse_s3_url(url)
    with explained_errors(address):
        client = client or s3_client()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        with explained_errors(address, client), _locked(cache_dir / ".lock", fcntl.LOCK_EX):
            head = client.head_object(Bucket=address.bucket, Key=address.key, ChecksumMode="ENABLED")
            entry = cache_dir / _entry_name(address, head)
            held.enter_context(_locked(entry / ".in-use", fcntl.LOCK_SH, create_parent=True))
            path = _cached_copy(entry, address, head) or _download(client, address, head, entry, cache_dir, max_cache_bytes)
        yield path


def _entry_name(address: S3Url, head: dict) -> str:
    """A cache entry's folder name: what identifies the object's content, hashed."""
    identity = [address.bucket, address.key, head.get("VersionId") or "", head["ETag"], str(head["ContentLength"])]
    return hashlib.sha256("\0".join(identity).encode()).hexdigest()[:32]


def _cached_copy(entry: Path, address: S3Url, head: dict) -> Path | None:
    """The entry's file if it is complete and its content matches the recorded SHA-256; else None."""
    record_path = entry / ENTRY_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    path = entry / record["name"]
    if not path.is_file() or path.stat().st_size != head["ContentLength"] or file_digests(path)["sha256"] != record["sha256"]:
        log.warning("cache entry of %s is damaged (%s); downloading it again", address, path)
        path.unlink(missing_ok=True)
        record_path.unlink()
        return None
    record_path.touch()  # its modification time is the entry's last use, for the LRU eviction
    log.info("cache hit: %s is %s", address, path)
    return path


def _download(client, address: S3Url, head: dict, entry: Path, cache_dir: Path, max_cache_bytes: int) -> Path:
    """Download the object into `entry`, verify it and record its SHA-256; make room first."""
    size = head["ContentLength"]
    if size > max_cache_bytes:
        raise HelixflowError(address, f"the object ({size:,} bytes) is larger than the S3 cache's limit "
                                      f"({max_cache_bytes:,} bytes): raise --s3-cache-max-gb")
    evict_least_recently_used(cache_dir, keep_bytes=max_cache_bytes - size, keep=entry)
    path = entry / (Path(address.key).name or "object")
    partial = path.with_name(path.name + ".part")
    log.info("downloading %s (%s bytes) into the cache %s", address, f"{size:,}", entry)
    client.download_file(address.bucket, address.key, str(partial),
                         ExtraArgs={"VersionId": head["VersionId"]} if head.get("VersionId") else None)
    digests = file_digests(partial)
    _verify(address, head, digests, partial)
    partial.rename(path)
    (entry / ENTRY_RECORD).write_text(json.dumps({"url": str(address), "name": path.name, "etag": head["ETag"],
                                                  "size": size, "sha256": digests["sha256"]}, indent=1))
    return path


def _verify(address: S3Url, head: dict, digests: dict[str, str], partial: Path) -> None:
    """Compare the download with the object's own checksums, where S3 keeps one a whole-file digest can match."""
    expected = {}
    for name in ("sha256", "crc32"):
        checksum = head.get(f"Checksum{name.upper()}", "")
        # A multipart upload's checksum of its parts' checksums ends in "-<parts>" (or says COMPOSITE).
        if checksum and "-" not in checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            expected[name] = base64.b64decode(checksum).hex()
    etag = head["ETag"].strip('"')
    if MD5_ETAG.match(etag) and not head.get("SSECustomerAlgorithm") and "kms" not in head.get("ServerSideEncryption", ""):
        expected["md5"] = etag
    wrong = [name for name, digest in expected.items() if digests[name] != digest]
    if partial.stat().st_size != head["ContentLength"] or wrong:
        partial.unlink()
        raise HelixflowError(address, f"the download does not match the object ({', '.join(wrong) or 'size'} differs); "
                                      f"run again to download it again")
    log.info("verified %s: %s", address, ", ".join(sorted(expected)) or "size only (S3 keeps no whole-file checksum)")


def file_digests(path: Path, block_size: int = 8 << 20) -> dict[str, str]:
    """SHA-256, MD5 and CRC32 of a file (hex), in one pass."""
    sha256, md5, crc32 = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as stream:
        while block := stream.read(block_size):
            sha256.update(block)
            md5.update(block)
            crc32 = zlib.crc32(block, crc32)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "crc32": f"{crc32:08x}"}


def evict_least_recently_used(cache_dir: Path, *, keep_bytes: int, keep: Path | None = None) -> None:
    """Remove cache entries, least recently used first, until at most `keep_bytes` remain.

    Entries that a run holds (a shared lock on ``.in-use``) and `keep` stay; so does
    everything while the caller holds the cache lock, which it must.
    """
    entries = sorted((folder for folder in Path(cache_dir).iterdir() if folder.is_dir() and folder != keep),
                     key=_last_used)
    total = sum(_folder_bytes(folder) for folder in Path(cache_dir).iterdir() if folder.is_dir())
    for folder in entries:
        if total <= keep_bytes:
            return
        if _held_by_a_run(folder):
            continue
        size = _folder_bytes(folder)
        shutil.rmtree(folder)
        total -= size
        log.info("evicted %s from the S3 cache (%s bytes, least recently used)", folder, f"{size:,}")


def _last_used(folder: Path) -> float:
    record = folder / ENTRY_RECORD
    return record.stat().st_mtime if record.is_file() else 0.0  # an unfinished download goes first


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _held_by_a_run(folder: Path) -> bool:
    marker = folder / ".in-use"
    if not marker.exists():
        return False
    with open(marker, "a") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@contextmanager
def _locked(path: Path, operation: int, *, create_parent: bool = False) -> Iterator[None]:
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as stream:
        fcntl.flock(stream, operation)
        yield


# -- uploading results -----------------------------------------------------------------------


def upload_results(local_dir: Path, url: str, *, client=None, transfer_config=None, skip: frozenset[str] = frozenset()) -> dict:
    """Upload every file of `local_dir` under the prefix `url`, then the manifest ``_SUCCESS`` last.

    Parameters
    ----------
    local_dir
        The results folder.
    url
        ``s3://bucket/prefix`` to upload to; files keep their paths relative to `local_dir`.
    client
        A boto3 S3 client; default: `s3_client()`.
    transfer_config
        A ``boto3.s3.transfer.TransferConfig`` (multipart threshold and part size); default: boto3's.
    skip
        Names of files or folders to leave out (matched against every part of a file's path),
        e.g. a lock file or snakemake's ``.snakemake`` folder.

    Returns
    -------
    dict
        The manifest: ``{"files": [{"path", "size", "sha256"}, ...]}``.
    """
    prefix = parse_s3_url(url)
    with explained_errors(prefix):
        client = client or s3_client()
    files = sorted(path for path in Path(local_dir).rglob("*")
                   if path.is_file() and not skip.intersection(path.relative_to(local_dir).parts))
    manifest = {"files": []}
    with explained_errors(prefix, client):
        # A reader must not take an earlier run's manifest for this one while files are replaced.
        client.delete_object(Bucket=prefix.bucket, Key=prefix.child(MANIFEST_NAME).key)
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            client.upload_file(str(path), prefix.bucket, prefix.child(relative).key, Config=transfer_config)
            manifest["files"].append({"path": relative, "size": path.stat().st_size, "sha256": file_digests(path)["sha256"]})
        client.put_object(Bucket=prefix.bucket, Key=prefix.child(MANIFEST_NAME).key,
                          Body=json.dumps(manifest, indent=1).encode(), ContentType="application/json")
    log.info("uploaded %d files to %s; manifest %s", len(files), prefix, prefix.child(MANIFEST_NAME))
    return manifest


def create_bucket(url: str, *, client=None) -> bool:
    """Create the bucket of `url` unless it exists; whether it was created.

    Parameters
    ----------
    url
        ``s3://bucket[/prefix]``: only the bucket is created (S3 prefixes need no creating).
    client
        A boto3 S3 client; default: `s3_client()`.
    """
    address = parse_s3_url(url)
    with explained_errors(address):
        client = client or s3_client()
    with explained_errors(address, client):
        # Asked first: in us-east-1, S3 answers a repeated CreateBucket of one's own bucket with success.
        if _bucket_exists(client, address):
            return False
        # Outside us-east-1, S3 wants the bucket's region named (MinIO takes either).
        region = client.meta.region_name
        where = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region not in (None, "us-east-1") else {}
        client.create_bucket(Bucket=address.bucket, **where)
    log.info("created bucket %s", address.bucket)
    return True
