"""Download imagery and labels from S3 or an S3-compatible store: python download/download.py

Lists s3://BUCKET/PREFIX (download_args.bucket, download_args.prefix, or --bucket/--prefix)
and downloads the keys matching download_args.pattern into data/raw/ (download_args.target)
and those matching download_args.labels_pattern into data/labels/, in parallel, with one
progress bar. Files land under their own name, as the later stages read those folders
(download_args.keep_folders keeps the folders below the prefix instead).

Interactive when stdin is a terminal and the bucket or the prefix is missing: it asks for the
bucket, offers the folders under the prefix as a numbered menu, shows how many files match
and their size, and asks before downloading. Scripted when both are given, or with --yes; it
never prompts when stdin is not a terminal. --dry-run lists what would be downloaded.

A rerun skips files already present with the same size and ETag (kept in
.download-manifest.json in the target folder) and completes what an interrupted run left:
each file is written to NAME.part, checked, and renamed when complete. Keys that would land
outside the target folder (../x.tif, /etc/x.tif, a/../../b.tif) are refused and reported.
Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, a named profile
(download_args.profile), or none for a public bucket (download_args.anonymous: true).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import json
import logging
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3ValidationError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import OSUtils

from core import cli
from core.errors import DownloadError
from core.files import atomic_path, human_size
from core.settings import DownloadArgs, Settings
from core.tree import DataTree

log = logging.getLogger(__name__)

#: Sidecar in each target folder: relative path -> key, size, ETag, mtime of finished downloads.
MANIFEST = ".download-manifest.json"
#: Suffix of a file being downloaded (s3transfer's temporary file); it never counts as done.
PART = ".part"
#: Bytes read at a time when checking a file's MD5.
CHUNK = 1 << 20
#: The first request (does the endpoint answer, does the bucket exist) fails fast: a wrong
#: endpoint is a typo far more often than a network that needs a dozen retries.
FIRST_REQUEST_TIMEOUT = 5.0
FIRST_REQUEST_ATTEMPTS = 1
#: The interactive menu counts matching files under a folder up to this many objects.
MENU_COUNT_LIMIT = 10_000
#: Folders numbered in the menu; others can still be opened by typing their name.
MENU_SHOWN = 100

NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to "
    "~/.aws/credentials (aws configure), or name a profile with --set download_args.profile=NAME; "
    "for a public bucket use --set download_args.anonymous=true"
)

Ask = Callable[[str], str]
Say = Callable[[str], None]


class TransferError(Exception):
    """One file arrived incomplete or did not match its checksum."""


@dataclass(frozen=True)
class S3Object:
    """One listed object; ``etag`` without its quotes."""

    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class Item:
    """An object and where it goes: ``root / rel``."""

    obj: S3Object
    root: Path
    rel: str

    @property
    def dest(self) -> Path:
        return self.root / self.rel


@dataclass
class Plan:
    """What a run will do: files to download, files already present, keys refused."""

    bucket: str
    prefix: str
    todo: list[Item] = field(default_factory=list)
    present: list[Item] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: Manifest entries per target folder, as read, plus files found present by checksum.
    manifests: dict[Path, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes to download."""
        return sum(item.obj.size for item in self.todo)


@dataclass
class Summary:
    """The outcome of a download run."""

    downloaded: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = f", {human_size(self.bytes / self.seconds)}/s" if self.bytes and self.seconds > 0 else ""
        refused = f", {len(self.refused)} refused" if self.refused else ""
        return (
            f"download: {self.downloaded} downloaded, {self.skipped} skipped, {len(self.failed)} failed{refused}, "
            f"{human_size(self.bytes)} in {self.seconds:.1f} s{rate}"
        )


@dataclass(frozen=True)
class Store:
    """A client for listing and transfers, a fail-fast one for the first request, the endpoint's name."""

    client: Any
    probe: Any
    endpoint: str
    #: ETags that look like an MD5 but are not one: the GET said SSE-KMS or SSE-C.
    not_md5: set[str] = field(default_factory=set)


# --- names and paths -----------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    """plural(1, 'file') -> '1 file'; plural(2, 'file') -> '2 files'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def redact_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def split_s3_url(bucket: str | None, prefix: str | None) -> tuple[str | None, str | None]:
    """Accept ``s3://bucket/prefix`` as a bucket; an explicit ``prefix`` wins over the URL's."""
    if bucket is None:
        return None, prefix
    bucket = bucket.strip()
    if bucket.startswith("s3://"):
        bucket, _, url_prefix = bucket[len("s3://") :].partition("/")
        if prefix is None and url_prefix:
            prefix = url_prefix
    return bucket or None, prefix


def folder_of(prefix: str) -> str:
    """The folder part of a prefix: 'a/b/tile_' -> 'a/b/'; files keep their path below it."""
    return prefix[: prefix.rfind("/") + 1]


def parent_of(prefix: str) -> str:
    """The folder above: 'a/b/' -> 'a/', 'a/' -> ''."""
    return folder_of(prefix.rstrip("/")) if prefix.endswith("/") else folder_of(prefix)


def matches(rel: str, pattern: str | None) -> bool:
    """Glob ``pattern`` on a key below the prefix's folder: on the file name when it has no '/'."""
    if not pattern:
        return False
    name = rel if "/" in pattern else rel.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(name, pattern)


def is_safe(rel: str, root: Path) -> bool:
    """Whether ``rel`` is a plain relative path that stays inside ``root`` (no '..', '.', '', absolute)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return False
    if any(part in ("", ".", "..") for part in parts):
        return False
    if parts[-1] == MANIFEST or parts[-1].endswith(PART):  # would clobber our own bookkeeping
        return False
    base = root.resolve()
    return (base / rel).resolve().is_relative_to(base)


# --- talking to S3 -------------------------------------------------------------------------------


class _Redact(logging.Filter):
    """Replace credential strings in log records (botocore's debug log shows request headers)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, "****")
            record.msg, record.args = message, None
        return True


def hide_in_logs(*values: str | None) -> None:
    """Keep these strings (access key, secret key, session token) out of every log handler's output."""
    secrets = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Redact) and f.secrets == secrets for f in handler.filters):
            handler.addFilter(_Redact(secrets))


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def explain(exc: BaseException, *, bucket: str | None = None, key: str = "", endpoint: str = "AWS S3") -> DownloadError:
    """Turn a boto3/botocore error into a one-line :class:`DownloadError` that says what to do."""
    where = f"s3://{bucket}/{key}" if bucket else endpoint
    at = "" if endpoint == "AWS S3" else f" at {endpoint}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            msg = f"bucket {bucket!r} does not exist{at}: check download_args.bucket (--bucket) and download_args.endpoint_url"
        elif code == "InvalidAccessKeyId":
            msg = (
                f"the access key is not known to {endpoint}: check AWS_ACCESS_KEY_ID, ~/.aws/credentials or "
                "download_args.profile"
            )
        elif code == "SignatureDoesNotMatch":
            msg = (
                "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY, ~/.aws/credentials "
                "or download_args.profile"
            )
        elif code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken"):
            msg = "the AWS credentials have expired: renew them (aws sso login, or a new session token) and rerun"
        elif code in ("AccessDenied", "AllAccessDisabled", "AccountProblem") or status == 403:
            msg = (
                f"access denied to {where}{at}: use credentials allowed to list and read it "
                "(download_args.profile), or --set download_args.anonymous=true for a public bucket"
            )
        elif code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") or (
            status == 301
        ):
            region = error.get("Region") or exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region"
            )
            msg = f"bucket {bucket!r} is in another region: set download_args.region" + (
                f" (--set download_args.region={region})" if region else ""
            )
        elif code == "NoSuchKey" or status == 404:
            msg = f"{where} no longer exists: rerun to list the bucket again"
        else:
            msg = f"S3 error {code or status} on {where}{at}: {error.get('Message', '')}".rstrip(": ")
    elif isinstance(exc, S3DownloadFailedError):  # s3transfer's word for a GET answered 412 to its If-Match
        msg = f"{where} changed in the bucket during the download: rerun to fetch the new version"
    elif isinstance(exc, NoCredentialsError):
        msg = NO_CREDENTIALS
    elif isinstance(exc, PartialCredentialsError):
        msg = f"incomplete AWS credentials ({exc.kwargs.get('cred_var', 'a value')} missing): " + NO_CREDENTIALS
    elif isinstance(exc, ProfileNotFound):
        msg = (
            f"AWS profile {exc.kwargs.get('profile')!r} not found in ~/.aws/credentials or ~/.aws/config: "
            "check download_args.profile, or create it with aws configure --profile NAME"
        )
    elif isinstance(exc, SSLError):
        msg = f"TLS error talking to {endpoint}: check download_args.endpoint_url (http:// or https://)"
    elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ProxyConnectionError):
        msg = f"cannot reach {endpoint}: check download_args.endpoint_url and the network, then rerun"
    elif isinstance(exc, ReadTimeoutError):
        msg = f"{endpoint} stopped answering while reading {where}: rerun to resume"
    elif isinstance(exc, ParamValidationError):
        detail = str(exc).partition("failed:")[2].strip().split(": ", 1)[0]  # 'Invalid bucket name "a b"'
        msg = f"invalid request for {where}: {detail}; check download_args.bucket and prefix"
    else:
        msg = f"{type(exc).__name__} on {where}{at}: {exc}"
    return DownloadError(_one_line(msg))


@contextmanager
def s3_errors(store: Store | None, bucket: str | None, key: str = "") -> Iterator[None]:
    """Raise boto3/botocore errors inside as a one-line :class:`DownloadError`."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise explain(exc, bucket=bucket, key=key, endpoint=store.endpoint if store else "AWS S3") from None


def connect(args: DownloadArgs) -> Store:
    """Clients for ``args``: credentials checked here, before any request; retries with backoff."""
    endpoint = redact_url(args.endpoint_url) if args.endpoint_url else "AWS S3"
    with s3_errors(None, None):
        session = boto3.Session(profile_name=args.profile, region_name=args.region)
        if not args.anonymous:
            credentials = session.get_credentials()
            if credentials is None:
                raise DownloadError(NO_CREDENTIALS)
            frozen = credentials.get_frozen_credentials()
            hide_in_logs(frozen.access_key, frozen.secret_key, frozen.token)

    def client(connect_timeout: float, attempts: int, read_timeout: float = 60) -> Any:
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": attempts},
            max_pool_connections=max(args.workers, 10),
            signature_version=UNSIGNED if args.anonymous else None,
            # MinIO, Ceph and most other S3-compatible stores want the bucket in the path.
            s3={"addressing_style": "path"} if args.endpoint_url else None,
            user_agent_extra="roof-classify-download",
        )
        try:
            return session.client("s3", endpoint_url=args.endpoint_url, config=config)
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise DownloadError(
                f"download_args.endpoint_url {endpoint!r} is not a valid URL ({exc}): give e.g. http://localhost:9000"
            ) from None

    with s3_errors(None, None):
        store = Store(
            client=client(args.connect_timeout, args.retries),
            # The first request answers fast or not at all: an endpoint that accepts connections and
            # never answers is found in FIRST_REQUEST_TIMEOUT seconds, not after minutes of retries.
            probe=client(
                min(args.connect_timeout, FIRST_REQUEST_TIMEOUT), FIRST_REQUEST_ATTEMPTS, FIRST_REQUEST_TIMEOUT
            ),
            endpoint=endpoint,
        )

    def note_not_md5(parsed: dict[str, Any], **kwargs: Any) -> None:
        # The ETag of an SSE-KMS or SSE-C object is not the MD5 of its content; only the GET says so.
        if str(parsed.get("ServerSideEncryption") or "").startswith("aws:kms") or parsed.get("SSECustomerAlgorithm"):
            store.not_md5.add(str(parsed.get("ETag", "")).strip('"'))

    store.client.meta.events.register("after-call.s3.GetObject", note_not_md5)
    return store


#: Error codes an S3 store answers a listing with; anything else (an HTML page's 404) is not S3.
S3_LIST_CODES = {"NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "PermanentRedirect", "AuthorizationHeaderMalformed",
                 "InvalidBucketName", "AccountProblem", "TokenRefreshRequired", "ExpiredTokenException",
                 "IllegalLocationConstraintException", "SlowDown", "InternalError", "ServiceUnavailable"}  # fmt: skip


def check_access(store: Store, bucket: str, prefix: str) -> None:
    """One quick listing: the endpoint answers, is S3, the bucket exists, the credentials may list it."""
    try:
        store.probe.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ReadTimeoutError:
        raise DownloadError(
            f"{store.endpoint} accepted the connection but did not answer a listing within "
            f"{FIRST_REQUEST_TIMEOUT:g} s: check that download_args.endpoint_url is an S3 endpoint and that it is up"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in S3_LIST_CODES and not (code == "403" or code == "301"):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise DownloadError(
                f"{store.endpoint} answered a bucket listing with HTTP {status} and no S3 error: it does not look "
                "like an S3 endpoint: check download_args.endpoint_url (the address of MinIO, Ceph or S3 itself)"
            ) from None
        raise explain(exc, bucket=bucket, key=prefix, endpoint=store.endpoint) from None
    except BotoCoreError as exc:
        raise explain(exc, bucket=bucket, key=prefix, endpoint=store.endpoint) from None


def list_objects(store: Store, bucket: str, prefix: str, limit: int | None = None) -> tuple[list[S3Object], bool]:
    """Objects under ``prefix`` (folder markers left out); also whether the listing is complete."""
    found: list[S3Object] = []
    seen = 0
    with s3_errors(store, bucket, prefix):
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                seen += 1
                if not entry["Key"].endswith("/"):
                    found.append(S3Object(entry["Key"], int(entry["Size"]), entry.get("ETag", "").strip('"')))
            if limit is not None and seen >= limit and page.get("IsTruncated"):
                return found, False
    return found, True


def list_folders(store: Store, bucket: str, prefix: str) -> list[str]:
    """The 'folders' (common prefixes ending in '/') right below ``prefix``."""
    folders: list[str] = []
    with s3_errors(store, bucket, prefix):
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    return folders


# --- what to download ----------------------------------------------------------------------------


def _is_md5(etag: str) -> bool:
    """A single-part upload's ETag is the MD5 of the content; a multipart one ends in -N."""
    return re.fullmatch(r"[0-9a-f]{32}", etag) is not None


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as src:
        for block in iter(functools.partial(src.read, CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """Entries of ``root``'s manifest; an unreadable one counts as empty (files are then checked again)."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): files there are checked again", path, exc)
        return {}
    return files


def write_manifest(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write ``root``'s manifest atomically (when it changed), keeping entries of files that still exist."""
    kept = {rel: entry for rel, entry in sorted(entries.items()) if (root / rel).is_file()}
    if (root / MANIFEST).is_file() and read_manifest(root) == kept:
        return
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"version": 1, "files": kept}, indent=1) + "\n", encoding="utf-8")


def manifest_entry(item: Item) -> dict[str, Any]:
    return {
        "key": item.obj.key,
        "size": item.obj.size,
        "etag": item.obj.etag,
        "mtime_ns": item.dest.stat().st_mtime_ns,
    }


def is_present(item: Item, manifest: dict[str, dict[str, Any]]) -> bool:
    """Whether ``item.dest`` already holds the object: same size and ETag.

    The manifest vouches for a file it recorded if its size and modification time are
    unchanged; otherwise a single-part ETag (an MD5) is checked against the file's content,
    and a match is recorded. A multipart ETag without a manifest entry cannot be checked.
    """
    try:
        stat = item.dest.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != item.obj.size:
        return False
    entry = manifest.get(item.rel)
    if (
        entry is not None
        and entry.get("etag") == item.obj.etag
        and entry.get("size") == item.obj.size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    ):
        return True
    if _is_md5(item.obj.etag) and file_md5(item.dest) == item.obj.etag:
        manifest[item.rel] = manifest_entry(item)
        return True
    return False


def plan_download(
    objects: Sequence[S3Object],
    *,
    bucket: str,
    prefix: str,
    pattern: str,
    labels_pattern: str | None,
    imagery_root: Path,
    labels_root: Path,
    keep_folders: bool = False,
    overwrite: bool = False,
) -> Plan:
    """Sort listed objects into files to download, files already present, and unsafe keys refused.

    A key goes to ``labels_root`` when it matches ``labels_pattern``, else to ``imagery_root``
    when it matches ``pattern``, under its file name, or with ``keep_folders`` its path below
    the prefix's folder. A key with '..', '.' or empty parts, or an absolute one, is refused
    either way. Two keys with one local name are an error, raised before anything is written.
    """
    plan = Plan(bucket=bucket, prefix=prefix)
    folder = folder_of(prefix)
    taken: dict[Path, str] = {}
    for obj in objects:
        rel = obj.key[len(folder) :]
        if matches(rel, labels_pattern):
            root = labels_root
        elif matches(rel, pattern):
            root = imagery_root
        else:
            continue
        name = rel if keep_folders else rel.rsplit("/", 1)[-1]
        if not (is_safe(rel, root) and is_safe(name, root)):
            plan.refused.append(obj.key)
            continue
        item = Item(obj, root, name)
        if item.dest in taken:
            raise DownloadError(
                f"s3://{bucket}/{taken[item.dest]} and s3://{bucket}/{obj.key} would both be {item.dest}: "
                "set download_args.keep_folders=true, or narrow the prefix or download_args.pattern"
            )
        taken[item.dest] = obj.key
        manifest = plan.manifests.setdefault(root, read_manifest(root))
        if not overwrite and is_present(item, manifest):
            plan.present.append(item)
        else:
            plan.todo.append(item)
    return plan


def nothing_matches(plan: Plan, objects: Sequence[S3Object], pattern: str, labels_pattern: str | None) -> DownloadError:
    where = f"s3://{plan.bucket}/{plan.prefix}"
    if not objects:
        return DownloadError(f"{where} is empty: check download_args.prefix (--prefix) and download_args.bucket")
    globs = repr(pattern) + (f" or labels_pattern {labels_pattern!r}" if labels_pattern else "")
    examples = ", ".join(o.key[len(folder_of(plan.prefix)) :] for o in objects[:3])
    return DownloadError(
        f"nothing under {where} matches download_args.pattern {globs} ({len(objects)} objects there, e.g. "
        f"{examples}): change download_args.pattern or the prefix"
    )


def check_free_space(plan: Plan) -> None:
    """Refuse to start when the files to download do not fit on the disk of their folder."""
    needed: dict[int, list[Any]] = {}
    for item in plan.todo:
        anchor = item.root
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
        device = anchor.stat().st_dev
        needed.setdefault(device, [0, anchor, item.root])[0] += item.obj.size
    for size, anchor, root in needed.values():
        free = shutil.disk_usage(anchor).free
        if size > free:
            raise DownloadError(
                f"not enough disk space: the download needs {human_size(size)} in {root} but only "
                f"{human_size(free)} is free: free some space, narrow download_args.pattern, or move data_root"
            )


def describe(plan: Plan) -> str:
    """'3 files, 1.2 MiB to download into data/raw; 2 already present; 1 key refused'."""
    if plan.todo:
        roots = " and ".join(sorted({str(item.root) for item in plan.todo}))
        text = f"{plural(len(plan.todo), 'file')}, {human_size(plan.size)} to download into {roots}"
    else:
        text = "nothing to download"
    text += f"; {len(plan.present)} already present"
    if plan.refused:
        text += f"; {plural(len(plan.refused), 'key')} refused (not a safe path)"
    return text


# --- transfers -----------------------------------------------------------------------------------


class _PartFiles(OSUtils):
    """s3transfer's file operations: NAME.part as the temporary file, renamed only once it holds the object.

    A fixed name is overwritten by the next run, not left behind by a killed one as s3transfer's
    random suffix would be; the check before the rename keeps a garbled file from ever
    appearing under its final name.
    """

    def __init__(self, objects: dict[str, S3Object], not_md5: Container[str]) -> None:
        self.objects = objects
        self.not_md5 = not_md5

    def get_temp_filename(self, filename: str) -> str:
        return filename + PART

    def rename_file(self, current_filename: str, new_filename: str) -> None:
        obj, size = self.objects[new_filename], Path(current_filename).stat().st_size
        if size != obj.size:
            raise TransferError(f"got {size} of {obj.size} bytes")
        if _is_md5(obj.etag) and obj.etag not in self.not_md5:
            md5 = file_md5(Path(current_filename))
            if md5 != obj.etag:
                raise TransferError(f"content does not match its ETag (MD5 {md5} != {obj.etag})")
        super().rename_file(current_filename, new_filename)


@dataclass(eq=False)
class _Attempt(BaseSubscriber):
    """One attempt at one file, subscribed to its transfer: the listed size and ETag in, bytes and the end out."""

    item: Item
    number: int
    count: Callable[[_Attempt, int], None]
    ended: queue.SimpleQueue
    bytes: int = 0
    future: TransferFuture | None = None

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        # No HeadObject; and every ranged GET carries If-Match, so the file is the listed version
        # or the transfer fails with PreconditionFailed.
        future.meta.provide_transfer_size(self.item.obj.size)
        future.meta.provide_object_etag(f'"{self.item.obj.etag}"')

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        self.count(self, bytes_transferred)  # negative when s3transfer retries a body cut off midway

    def on_done(self, future: TransferFuture, **kwargs: Any) -> None:
        self.future = future
        self.ended.put(self)


def failure(exc: Exception, bucket: str, key: str, endpoint: str) -> str:
    """The summary's line for a file that failed."""
    if isinstance(exc, RetriesExceededError):  # s3transfer gave up on a body cut off each time
        exc = exc.last_exception
    if isinstance(exc, BotoCoreError | ClientError | S3DownloadFailedError):
        return str(explain(exc, bucket=bucket, key=key, endpoint=endpoint))
    return f"s3://{bucket}/{key}: {exc}"


def download(
    store: Store,
    plan: Plan,
    *,
    workers: int = 8,
    retries: int = 5,
    on_bytes: Callable[[int], None] | None = None,
) -> Summary:
    """Download ``plan.todo`` with boto3's transfer manager, ``workers`` GETs at a time, one progress bar in bytes.

    s3transfer writes each file to NAME.part (large ones in 8 MiB ranges), gets a body cut off
    midway again (``retries`` attempts per GET) and renames the file once its size and MD5 are
    right; a file that fails that check is downloaded again, ``retries`` times in all. Failed
    files are recorded in the summary, not raised; the manifests are written in the end,
    interrupted or not, so a rerun skips every finished file.
    """
    start = time.monotonic()
    summary = Summary(skipped=len(plan.present), refused=list(plan.refused))
    config = TransferConfig(
        multipart_threshold=1,  # every GET ranged: s3transfer sends If-Match with ranged GETs only
        max_request_concurrency=workers,
        max_submission_concurrency=1,  # GETs start in the plan's order
        num_download_attempts=retries,
    )
    files = _PartFiles({str(item.dest): item.obj for item in plan.todo}, store.not_md5)
    ended: queue.SimpleQueue[_Attempt] = queue.SimpleQueue()
    lock = threading.Lock()
    with cli.progress(total=plan.size, unit="B", unit_scale=True, unit_divisor=1024, desc="download") as bar:

        def count(attempt: _Attempt, n: int) -> None:
            with lock:
                attempt.bytes += n
                bar.update(n)
            if on_bytes is not None:
                on_bytes(n)

        try:
            # Leaving the manager on an exception (Ctrl-C too) cancels the transfers in flight and
            # waits for them; s3transfer removes their NAME.part files.
            with TransferManager(store.client, config, files) as manager:

                def submit(item: Item, number: int) -> None:
                    item.dest.parent.mkdir(parents=True, exist_ok=True)
                    attempt = _Attempt(item, number, count, ended)
                    manager.download(plan.bucket, item.obj.key, str(item.dest), subscribers=[attempt])

                for item in plan.todo:
                    submit(item, 1)
                left = len(plan.todo)
                while left:
                    attempt = ended.get()
                    item = attempt.item
                    try:
                        attempt.future.result()  # type: ignore[union-attr]
                    except (BotoCoreError, ClientError, TransferError, OSError, RetriesExceededError,
                            S3DownloadFailedError, S3ValidationError) as exc:  # fmt: skip
                        count(attempt, -attempt.bytes)  # the bar counts finished files only
                        if isinstance(exc, TransferError) and attempt.number < retries:
                            submit(item, attempt.number + 1)
                            continue
                        summary.failed[item.obj.key] = failure(exc, plan.bucket, item.obj.key, store.endpoint)
                    else:
                        summary.downloaded += 1
                        summary.bytes += item.obj.size
                        plan.manifests.setdefault(item.root, {})[item.rel] = manifest_entry(item)
                    left -= 1
        finally:
            for root, entries in plan.manifests.items():
                if root.is_dir():
                    write_manifest(root, entries)
            summary.seconds = time.monotonic() - start
    return summary


# --- interactive choices -------------------------------------------------------------------------


def ask_bucket(ask: Ask) -> tuple[str, str | None]:
    """Ask until a bucket name (or s3://bucket/prefix) is given."""
    while True:
        bucket, prefix = split_s3_url(ask("S3 bucket (NAME or s3://NAME/PREFIX): "), None)
        if bucket:
            return bucket, prefix


def choose_prefix(
    store: Store,
    bucket: str,
    prefix: str,
    *,
    pattern: str,
    labels_pattern: str | None,
    ask: Ask,
    say: Say,
) -> str | None:
    """Walk the bucket's folders from ``prefix`` with a numbered menu; the chosen prefix, or None to quit."""
    while True:
        folders = list_folders(store, bucket, prefix)
        objects, complete = list_objects(store, bucket, prefix, limit=MENU_COUNT_LIMIT)
        base = folder_of(prefix)
        wanted = [
            o for o in objects if matches(o.key[len(base) :], pattern) or matches(o.key[len(base) :], labels_pattern)
        ]
        say(f"\ns3://{bucket}/{prefix}")
        for number, folder in enumerate(folders[:MENU_SHOWN], 1):
            say(f"  {number:3d}) {folder[len(base) :]}")
        if len(folders) > MENU_SHOWN:
            say(f"       ... and {len(folders) - MENU_SHOWN} more: type a folder's name to open it")
        if not folders:
            say("       (no folders below)")
        globs = pattern + (f" or {labels_pattern}" if labels_pattern else "")
        counted = "" if complete else f" (counted in the first {MENU_COUNT_LIMIT} objects; open a folder to see all)"
        matching = f"{plural(len(wanted), 'file')} {'matches' if len(wanted) == 1 else 'match'}"
        say(f"  {matching} {globs} here and below, {human_size(sum(o.size for o in wanted))}{counted}")
        answer = ask("Number or name to open, .. to go up, Enter to download from here, q to quit: ").strip()
        if answer == "":
            if wanted or not complete:
                return prefix
            say("  nothing here to download: open a folder, or go up")
        elif answer.lower() in ("q", "quit"):
            return None
        elif answer == "..":
            prefix = parent_of(prefix)
        elif answer.isdigit() and 1 <= int(answer) <= min(len(folders), MENU_SHOWN):
            prefix = folders[int(answer) - 1]
        elif base + answer.strip("/") + "/" in folders:
            prefix = base + answer.strip("/") + "/"
        else:
            say(f"  no such choice: {answer!r}")


def confirm(plan: Plan, ask: Ask, say: Say) -> bool:
    """Show the plan and ask before downloading."""
    say(describe(plan))
    if not plan.todo:
        return True
    answer = ask(f"Download {plural(len(plan.todo), 'file')} ({human_size(plan.size)})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def print_plan(plan: Plan, say: Say) -> None:
    """--dry-run: one line per file that would be downloaded, then the totals."""
    for item in plan.todo:
        say(f"{human_size(item.obj.size):>10}  s3://{plan.bucket}/{item.obj.key} -> {item.dest}")
    for key in plan.refused:
        say(f"{'refused':>10}  s3://{plan.bucket}/{key}: not a safe path below the target")
    say(f"dry run: {describe(plan)}; nothing downloaded")


# --- the whole run -------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


def download_prefix(
    args: DownloadArgs,
    tree: DataTree,
    *,
    ask: Ask | None = None,
    say: Say = _say,
    dry_run: bool = False,
    overwrite: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> Summary | None:
    """List, plan and download what ``args`` selects into ``tree``; the summary, or None when nothing ran.

    ``ask`` (a prompt function such as ``input``) makes the run interactive where the bucket
    or prefix is missing; without it a missing bucket is an error and a missing prefix means
    the whole bucket. ``overwrite`` downloads files even when present. ``on_bytes`` is called
    with the size of every chunk received (negative when an attempt is taken back: a body cut
    off midway, a file that failed its check).
    """
    bucket, prefix = split_s3_url(args.bucket, args.prefix)
    interactive = ask is not None and (bucket is None or prefix is None)
    if bucket is None and ask is None:
        raise DownloadError(
            "download_args.bucket is not set: pass --bucket NAME (or s3://NAME/PREFIX) or "
            "--set download_args.bucket=NAME (stdin is not a terminal, so there is no prompt)"
        )
    try:
        if bucket is None:
            bucket, typed_prefix = ask_bucket(ask)  # type: ignore[arg-type]
            prefix = typed_prefix if typed_prefix is not None else prefix
        store = connect(args)
        check_access(store, bucket, prefix or "")
        if interactive and prefix is None:
            prefix = choose_prefix(
                store, bucket, "", pattern=args.pattern, labels_pattern=args.labels_pattern, ask=ask, say=say
            )
            if prefix is None:
                say("nothing downloaded")
                return None
        prefix = prefix or ""
        objects, _ = list_objects(store, bucket, prefix)
        imagery_root = tree.labels if args.target == "labels" else tree.raw
        plan = plan_download(
            objects,
            bucket=bucket,
            prefix=prefix,
            pattern=args.pattern,
            labels_pattern=args.labels_pattern,
            imagery_root=imagery_root,
            labels_root=tree.labels,
            keep_folders=args.keep_folders,
            overwrite=overwrite,
        )
        if not (plan.todo or plan.present or plan.refused):
            raise nothing_matches(plan, objects, args.pattern, args.labels_pattern)
        if dry_run:
            print_plan(plan, say)
            return None
        check_free_space(plan)
        if interactive and not confirm(plan, ask, say):  # type: ignore[arg-type]
            say("nothing downloaded")
            return None
    except EOFError:  # Ctrl-D at a prompt
        say("\nnothing downloaded")
        return None
    log.info("download: %s", describe(plan))
    return download(store, plan, workers=args.workers, retries=args.retries, on_bytes=on_bytes)


def check_summary(summary: Summary) -> None:
    """Log the summary; failed or refused files make it an error (exit 1) whose line names the first."""
    for message in list(summary.failed.values())[1:]:
        log.warning("failed: %s", message)
    log.info(summary.line())
    problems = []
    if summary.failed:
        message = next(iter(summary.failed.values()))
        total = summary.downloaded + len(summary.failed)
        problems.append(f"{len(summary.failed)} of {plural(total, 'file')} failed (first: {message})")
    if summary.refused:
        shown = ", ".join(summary.refused[:5]) + (" ... (--dry-run lists them all)" if len(summary.refused) > 5 else "")
        problems.append(
            f"refused {plural(len(summary.refused), 'key')} that would be written outside the target folder "
            f"(.., absolute or empty path parts): {shown}; rename them in the bucket or narrow download_args.pattern"
        )
    if summary.failed:
        problems.append("finished files are kept and a rerun retries the rest")
    if problems:
        raise DownloadError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--bucket", metavar="NAME", help="bucket, or s3://NAME/PREFIX (overrides download_args.bucket)")
    parser.add_argument(
        "--prefix", metavar="PREFIX", help="key prefix to download from (overrides download_args.prefix)"
    )
    parser.add_argument("-y", "--yes", action="store_true", help="never prompt: use the settings and flags as given")
    parser.add_argument("--dry-run", action="store_true", help="list what would be downloaded; download nothing")

    def body(args: argparse.Namespace, settings: Settings, tree: DataTree) -> None:
        flags = {"bucket": args.bucket, "prefix": args.prefix}
        options = settings.download_args.model_copy(update={k: v for k, v in flags.items() if v is not None})
        prompt = input if not args.yes and sys.stdin is not None and sys.stdin.isatty() else None
        summary = download_prefix(options, tree, ask=prompt, dry_run=args.dry_run, overwrite=args.overwrite)
        if summary is not None:
            check_summary(summary)

    return cli.run(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
