"""download/download.py against a real S3 endpoint: moto_server on 127.0.0.1, reached through boto3.

Nothing in boto3 is patched: the code under test talks HTTP to a moto_server subprocess
started once per session. Each test has its own bucket. Fake credentials come from the
environment; the developer's own AWS configuration is never read.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from core.settings import DownloadArgs
from core.tree import DataTree
from download import download as dl

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "AKIAFAKEACCESSKEY42"
SECRET_KEY = "fake-Secret-Key-never-printed-7f3a9"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto_server subprocess on a free port of 127.0.0.1; stopped by its PID at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    server = Path(sys.executable).parent / "moto_server"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log_file, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log_path.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials in the environment; no real AWS config, profile, endpoint or metadata service."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def no_secret_in_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test prints or logs (stdout, stderr, log handlers writing there) never holds the secret key."""
    seen: list[str] = []
    original = capsys.readouterr

    def spy() -> pytest.CaptureResult[str]:
        result = original()
        seen.append(result.out + result.err)
        return result

    monkeypatch.setattr(capsys, "readouterr", spy)
    yield
    rest = original()
    text = "".join(seen) + rest.out + rest.err
    assert SECRET_KEY not in text


@pytest.fixture
def s3(moto_endpoint: str) -> object:
    """An admin client for arranging buckets (not the code under test)."""
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def payload(key: str, size: int = 3000) -> bytes:
    """Distinct, reproducible bytes for each key."""
    seed = key.encode()
    return (seed * (size // max(len(seed), 1) + 1))[:size]


@pytest.fixture
def bucket(s3) -> Callable[..., str]:
    """``bucket({key: bytes or size, ...}, acl=None) -> name``: a new bucket (unique name) holding those keys."""

    def make(objects: dict[str, bytes | int], acl: str | None = None) -> str:
        name = f"test-{uuid.uuid4().hex[:20]}"
        s3.create_bucket(Bucket=name)
        for key, body in objects.items():
            data = payload(key, body) if isinstance(body, int) else body
            extra = {"ACL": acl} if acl else {}
            s3.put_object(Bucket=name, Key=key, Body=data, **extra)
        return name

    return make


SCENE = {
    "scenes/a/tile_1.tif": 3000,
    "scenes/a/tile_2.tif": 5000,
    "scenes/b/tile_3.tif": 4000,
    "scenes/b/notes.txt": 100,
    "scenes/labels/roofs.geojson": 700,
    "other/tile_9.tif": 2000,
}


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative POSIX path -> bytes)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data_files(folder: Path) -> dict[str, bytes]:
    """Like :func:`files_under` without the manifest."""
    return {k: v for k, v in files_under(folder).items() if not k.endswith(dl.MANIFEST)}


@pytest.fixture
def argv(stage_argv: list[str], moto_endpoint: str) -> Callable[..., list[str]]:
    """``argv(bucket, *more)``: arguments of main() against moto, scripted."""

    def make(bucket: str | None, *more: str) -> list[str]:
        args = [*stage_argv, "--set", f"download_args.endpoint_url={moto_endpoint}", *more]
        return args if bucket is None else [*args, "--bucket", bucket]

    return make


def options(moto_endpoint: str, bucket: str | None, **kwargs: object) -> DownloadArgs:
    return DownloadArgs(**{"bucket": bucket, "endpoint_url": moto_endpoint, "workers": 2, **kwargs})


# --- pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "safe"),
    [
        ("tile.tif", True),
        ("a/b/tile.tif", True),
        ("../x.tif", False),
        ("/etc/x.tif", False),
        ("a/../../b.tif", False),
        ("a/../b.tif", False),
        ("./c.tif", False),
        ("a//d.tif", False),
        ("", False),
        ("a\\..\\x.tif", False),
        (dl.MANIFEST, False),
        ("tile.tif.part", False),
    ],
)
def test_is_safe(rel: str, safe: bool, tmp_path: Path) -> None:
    assert dl.is_safe(rel, tmp_path / "raw") is safe


def test_is_safe_refuses_a_symlink_out_of_the_target(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "raw" / "link").symlink_to(tmp_path / "elsewhere")
    assert dl.is_safe("link/x.tif", tmp_path / "raw") is False


@pytest.mark.parametrize(
    ("rel", "pattern", "expected"),
    [
        ("a/tile.tif", "*.tif", True),
        ("a/tile.TIF", "*.tif", False),
        ("a/tile.tif", "tile*", True),
        ("a/tile.tif", "a/*.tif", True),
        ("b/tile.tif", "a/*.tif", False),
        ("tile.tif", None, False),
    ],
)
def test_matches(rel: str, pattern: str | None, expected: bool) -> None:
    assert dl.matches(rel, pattern) is expected


@pytest.mark.parametrize(
    ("bucket", "prefix", "expected"),
    [
        ("name", None, ("name", None)),
        ("s3://name/some/prefix/", None, ("name", "some/prefix/")),
        ("s3://name/some/", "given/", ("name", "given/")),
        ("s3://name", None, ("name", None)),
        (None, "p/", (None, "p/")),
    ],
)
def test_split_s3_url(bucket: str | None, prefix: str | None, expected: tuple) -> None:
    assert dl.split_s3_url(bucket, prefix) == expected


def test_folder_and_parent() -> None:
    assert dl.folder_of("a/b/tile_") == "a/b/"
    assert dl.folder_of("a/b/") == "a/b/"
    assert dl.folder_of("") == ""
    assert dl.parent_of("a/b/") == "a/"
    assert dl.parent_of("a/") == ""
    assert dl.parent_of("") == ""


def test_redact_url() -> None:
    assert dl.redact_url("http://user:pw@host:9000/x") == "http://host:9000/x"
    assert dl.redact_url("https://s3.example.org") == "https://s3.example.org"


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ({"Code": "NoSuchBucket"}, "does not exist"),
        ({"Code": "AccessDenied"}, "access denied"),
        ({"Code": "InvalidAccessKeyId"}, "access key is not known"),
        ({"Code": "SignatureDoesNotMatch"}, "secret key does not match"),
        ({"Code": "ExpiredToken"}, "expired"),
        ({"Code": "PermanentRedirect", "Region": "eu-west-1"}, "download_args.region=eu-west-1"),
        ({"Code": "SlowDown", "Message": "Please reduce your request rate."}, "S3 error SlowDown"),
    ],
)
def test_explain_client_errors(error: dict, words: str) -> None:
    exc = ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "ListObjectsV2")
    message = str(dl.explain(exc, bucket="bkt", endpoint="http://host:9000"))
    assert words in message
    assert "\n" not in message


def test_explain_other_errors() -> None:
    assert "AWS_ACCESS_KEY_ID" in str(dl.explain(NoCredentialsError()))
    unreachable = dl.explain(EndpointConnectionError(endpoint_url="http://host:1"), endpoint="http://host:1")
    assert (
        str(unreachable) == "cannot reach http://host:1: check download_args.endpoint_url and the network, then rerun"
    )


def test_human_size_and_plural() -> None:
    assert dl.human_size(0) == "0 B"
    assert dl.human_size(1536) == "1.5 KiB"
    assert dl.human_size(3 * 1024**3) == "3.0 GiB"
    assert dl.plural(1, "file") == "1 file"
    assert dl.plural(2, "key") == "2 keys"


# --- downloading -----------------------------------------------------------------------------------


def test_downloads_a_prefix_with_a_pattern(bucket, argv, tmp_path: Path, capsys) -> None:
    name = bucket(SCENE)
    assert dl.main(argv(name, "--prefix", "scenes/")) == 0
    assert data_files(tmp_path / "data" / "raw") == {
        "tile_1.tif": payload("scenes/a/tile_1.tif", 3000),
        "tile_2.tif": payload("scenes/a/tile_2.tif", 5000),
        "tile_3.tif": payload("scenes/b/tile_3.tif", 4000),
    }
    assert not (tmp_path / "data" / "labels").exists()
    manifest = json.loads((tmp_path / "data" / "raw" / dl.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["tile_1.tif", "tile_2.tif", "tile_3.tif"]
    assert manifest["files"]["tile_1.tif"]["key"] == "scenes/a/tile_1.tif"
    assert capsys.readouterr().err == ""  # --quiet: no bars, no info


def test_labels_pattern_goes_to_labels(bucket, argv, tmp_path: Path) -> None:
    name = bucket(SCENE)
    more = ("--prefix", "scenes/", "--set", "download_args.labels_pattern=*.geojson")
    assert dl.main(argv(name, *more)) == 0
    assert data_files(tmp_path / "data" / "labels") == {"roofs.geojson": payload("scenes/labels/roofs.geojson", 700)}
    assert sorted(data_files(tmp_path / "data" / "raw")) == ["tile_1.tif", "tile_2.tif", "tile_3.tif"]


def test_keep_folders_keeps_the_path_below_the_prefix(bucket, argv, tmp_path: Path) -> None:
    name = bucket(SCENE)
    assert dl.main(argv(name, "--prefix", "scenes/", "--set", "download_args.keep_folders=true")) == 0
    assert sorted(data_files(tmp_path / "data" / "raw")) == ["a/tile_1.tif", "a/tile_2.tif", "b/tile_3.tif"]


def test_prefix_in_an_s3_url_and_a_partial_prefix(bucket, argv, tmp_path: Path) -> None:
    name = bucket(SCENE)
    assert dl.main(argv(f"s3://{name}/scenes/a/tile_2")) == 0
    assert sorted(data_files(tmp_path / "data" / "raw")) == ["tile_2.tif"]


def test_one_file_name_twice_is_an_error_before_any_write(bucket, argv, tmp_path: Path, capsys) -> None:
    name = bucket({"a/x.tif": 10, "b/x.tif": 20})
    assert dl.main(argv(name, "--prefix", "")) == 1
    err = capsys.readouterr().err
    assert "would both be" in err and "keep_folders" in err
    assert not (tmp_path / "data" / "raw").exists()


def test_rerun_transfers_nothing(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket(SCENE)
    args = options(moto_endpoint, name, prefix="scenes/", labels_pattern="*.geojson")
    first = dl.download_prefix(args, data_tree)
    assert (first.downloaded, first.skipped, first.failed, first.bytes) == (4, 0, {}, 3000 + 5000 + 4000 + 700)
    mtimes = {p: p.stat().st_mtime_ns for p in data_tree.raw.iterdir()}
    second = dl.download_prefix(args, data_tree)
    assert (second.downloaded, second.skipped, second.failed, second.bytes) == (0, 4, {}, 0)
    assert {p: p.stat().st_mtime_ns for p in data_tree.raw.iterdir()} == mtimes


def test_rerun_without_manifest_checks_md5_and_skips(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket(SCENE)
    args = options(moto_endpoint, name, prefix="scenes/")
    dl.download_prefix(args, data_tree)
    (data_tree.raw / dl.MANIFEST).unlink()
    again = dl.download_prefix(args, data_tree)
    assert (again.downloaded, again.skipped, again.bytes) == (0, 3, 0)
    assert sorted(json.loads((data_tree.raw / dl.MANIFEST).read_text())["files"]) == [
        "tile_1.tif",
        "tile_2.tif",
        "tile_3.tif",
    ]


@pytest.mark.parametrize("damage", ["truncated", "same size, other content", "empty"])
def test_damaged_local_file_is_downloaded_again(bucket, moto_endpoint, data_tree: DataTree, damage: str) -> None:
    name = bucket(SCENE)
    args = options(moto_endpoint, name, prefix="scenes/")
    dl.download_prefix(args, data_tree)
    target = data_tree.raw / "tile_2.tif"
    good = target.read_bytes()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms): let the damage show
    bad = {"truncated": good[:1234], "same size, other content": b"x" * len(good), "empty": b""}[damage]
    target.write_bytes(bad)
    again = dl.download_prefix(args, data_tree)
    assert (again.downloaded, again.skipped, again.bytes) == (1, 2, len(good))
    assert target.read_bytes() == good


def test_changed_object_in_the_bucket_is_downloaded_again(bucket, s3, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket(SCENE)
    args = options(moto_endpoint, name, prefix="scenes/a/")
    dl.download_prefix(args, data_tree)
    s3.put_object(Bucket=name, Key="scenes/a/tile_1.tif", Body=b"n" * 3000)  # same size, new ETag
    again = dl.download_prefix(args, data_tree)
    assert (again.downloaded, again.skipped) == (1, 1)
    assert (data_tree.raw / "tile_1.tif").read_bytes() == b"n" * 3000


def test_leftover_part_file_does_not_count_and_is_replaced(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket({"t/tile_1.tif": 4000})
    data_tree.raw.mkdir(parents=True)
    (data_tree.raw / "tile_1.tif.part").write_bytes(b"half a file from a killed run")
    summary = dl.download_prefix(options(moto_endpoint, name, prefix="t/"), data_tree)
    assert (summary.downloaded, summary.skipped, summary.bytes) == (1, 0, 4000)
    assert files_under(data_tree.raw).keys() == {"tile_1.tif", dl.MANIFEST}
    assert (data_tree.raw / "tile_1.tif").read_bytes() == payload("t/tile_1.tif", 4000)


def test_overwrite_downloads_present_files_again(bucket, argv, tmp_path: Path) -> None:
    name = bucket({"t/tile_1.tif": 100})
    assert dl.main(argv(name, "--prefix", "t/")) == 0
    target = tmp_path / "data" / "raw" / "tile_1.tif"
    before = target.stat().st_mtime_ns
    time.sleep(0.05)
    assert dl.main(argv(name, "--prefix", "t/", "--overwrite")) == 0
    assert target.stat().st_mtime_ns != before


def test_interrupted_transfer_leaves_nothing_and_a_rerun_completes(bucket, moto_endpoint, data_tree: DataTree) -> None:
    big = 3 * dl.CHUNK + 17  # several chunks, so the interruption falls midway
    name = bucket({"t/tile_1.tif": big, "t/tile_2.tif": big})
    args = options(moto_endpoint, name, prefix="t/", workers=1)

    def ctrl_c(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.download_prefix(args, data_tree, on_bytes=ctrl_c)
    assert data_files(data_tree.raw) == {}  # no .part, no half file
    summary = dl.download_prefix(args, data_tree)
    assert (summary.downloaded, summary.skipped, summary.bytes) == (2, 0, 2 * big)
    assert data_files(data_tree.raw) == {f"tile_{i}.tif": payload(f"t/tile_{i}.tif", big) for i in (1, 2)}


def test_ctrl_c_cancels_the_transfers_in_flight(bucket, moto_endpoint, data_tree: DataTree) -> None:
    big = 3 * dl.CHUNK + 17
    name = bucket({"t/tile_1.tif": big, "t/tile_2.tif": big})
    args = options(moto_endpoint, name, prefix="t/", workers=1)
    pressed: list[int] = []

    def ctrl_c(n: int) -> None:  # SIGINT to the main thread, as a terminal sends it, once the bytes flow
        if not pressed:
            pressed.append(n)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(1)  # hold this transfer midway while the main thread cancels it

    with pytest.raises(KeyboardInterrupt):
        dl.download_prefix(args, data_tree, on_bytes=ctrl_c)
    assert data_files(data_tree.raw) == {}  # no .part, no half file
    summary = dl.download_prefix(args, data_tree)
    assert (summary.downloaded, summary.skipped, summary.bytes) == (2, 0, 2 * big)


def test_object_changed_after_the_listing_fails_instead_of_mixing_versions(bucket, s3, moto_endpoint, data_tree):
    name = bucket({"t/tile_1.tif": 3000})
    store = dl.connect(options(moto_endpoint, name))
    objects, _ = dl.list_objects(store, name, "t/")
    plan = dl.plan_download(objects, bucket=name, prefix="t/", pattern="*.tif", labels_pattern=None,
                            imagery_root=data_tree.raw, labels_root=data_tree.labels)  # fmt: skip
    s3.put_object(Bucket=name, Key="t/tile_1.tif", Body=b"n" * 3000)  # a new version after the listing
    summary = dl.download(store, plan)
    assert summary.failed == {
        "t/tile_1.tif": f"s3://{name}/t/tile_1.tif changed in the bucket during the download: rerun to fetch the "
        "new version"
    }
    assert data_files(data_tree.raw) == {}


def test_failed_transfer_is_reported_and_retried_by_a_rerun(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket({"t/tile_1.tif": 2 * dl.CHUNK, "t/tile_2.tif": 1000})
    args = options(moto_endpoint, name, prefix="t/", workers=1)
    calls = []

    def disk_full_once(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")

    summary = dl.download_prefix(args, data_tree, on_bytes=disk_full_once)
    assert summary.downloaded == 1
    assert list(summary.failed) == ["t/tile_1.tif"]
    assert "No space left on device" in summary.failed["t/tile_1.tif"]
    assert sorted(data_files(data_tree.raw)) == ["tile_2.tif"]
    with pytest.raises(dl.DownloadError, match=r"1 of 2 files failed .*rerun"):
        dl.check_summary(summary)
    again = dl.download_prefix(args, data_tree)
    assert (again.downloaded, again.skipped, again.bytes) == (1, 1, 2 * dl.CHUNK)


def test_multipart_object_without_md5_etag(bucket, s3, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket({})
    part_size = 5 * 1024 * 1024
    upload = s3.create_multipart_upload(Bucket=name, Key="t/big.tif")
    parts = []
    for number, body in enumerate([b"a" * part_size, b"b" * 10], 1):
        etag = s3.upload_part(Bucket=name, Key="t/big.tif", UploadId=upload["UploadId"], PartNumber=number, Body=body)
        parts.append({"PartNumber": number, "ETag": etag["ETag"]})
    s3.complete_multipart_upload(
        Bucket=name, Key="t/big.tif", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    args = options(moto_endpoint, name, prefix="t/")
    first = dl.download_prefix(args, data_tree)
    assert (first.downloaded, first.bytes) == (1, part_size + 10)
    assert json.loads((data_tree.raw / dl.MANIFEST).read_text())["files"]["big.tif"]["etag"].endswith("-2")
    assert dl.download_prefix(args, data_tree).bytes == 0
    (data_tree.raw / dl.MANIFEST).unlink()  # a multipart ETag cannot be checked against the file: fetch again
    assert dl.download_prefix(args, data_tree).bytes == part_size + 10


class FaultyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of moto_server that cuts off or garbles the bodies of object downloads.

    ``cut`` object GETs are cut off halfway (the connection closes early); with ``garble`` every
    object body has one byte flipped and no checksum headers, so only the ETag can catch it.
    """

    daemon_threads = True

    def __init__(self, upstream: str, cut: int = 0, garble: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urlsplit(upstream).netloc
        self.cut = cut
        self.garble = garble
        self.object_gets = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=10)
        upstream.request("GET", self.path, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        is_object = "?" not in self.path and self.path.count("/") >= 2 and response.status in (200, 206)
        cut = garble = False
        if is_object:
            self.server.object_gets += 1
            cut = self.server.object_gets <= self.server.cut
            garble = self.server.garble
        if garble:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(response.status)
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in ("content-length", "transfer-encoding", "connection", "server", "date"):
                continue
            if garble and lower.startswith("x-amz-checksum"):
                continue
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(body)


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[Callable[..., FaultyProxy]]:
    """``proxy(cut=0, garble=False)``: a :class:`FaultyProxy` in front of moto, stopped after the test."""
    started: list[FaultyProxy] = []

    def start(**faults: object) -> FaultyProxy:
        server = FaultyProxy(moto_endpoint, **faults)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def test_transfer_cut_off_midway_is_retried(bucket, proxy, data_tree: DataTree) -> None:
    size = 2 * dl.CHUNK + 5
    name = bucket({"t/tile_1.tif": size})
    server = proxy(cut=1)
    progress: list[int] = []
    summary = dl.download_prefix(options(server.url, name, prefix="t/"), data_tree, on_bytes=progress.append)
    assert (summary.downloaded, summary.failed, summary.bytes) == (1, {}, size)
    assert server.object_gets == 2
    assert min(progress) < 0 and sum(progress) == size  # the cut-off attempt is taken back from the bar
    assert data_files(data_tree.raw) == {"tile_1.tif": payload("t/tile_1.tif", size)}


def test_garbled_transfer_fails_its_checksum_and_writes_nothing(bucket, proxy, data_tree: DataTree) -> None:
    name = bucket({"t/tile_1.tif": 5000})
    server = proxy(garble=True)
    summary = dl.download_prefix(options(server.url, name, prefix="t/", retries=2), data_tree)
    assert summary.downloaded == 0
    assert "content does not match its ETag" in summary.failed["t/tile_1.tif"]
    assert server.object_gets == 2  # tried again once (retries=2), then gave up
    assert data_files(data_tree.raw) == {}


def test_an_sse_kms_etag_is_not_checked_as_an_md5(bucket, s3, proxy, data_tree: DataTree) -> None:
    name = bucket({})
    body = payload("t/tile_1.tif", 5000)
    s3.put_object(Bucket=name, Key="t/tile_1.tif", Body=body, ServerSideEncryption="aws:kms")
    server = proxy(garble=True)  # content that differs from its ETag, as an SSE-KMS object's does on AWS (not moto)
    summary = dl.download_prefix(options(server.url, name, prefix="t/"), data_tree)
    assert (summary.downloaded, summary.failed, server.object_gets) == (1, {}, 1)
    assert data_files(data_tree.raw) == {"tile_1.tif": bytes([body[0] ^ 0xFF]) + body[1:]}


@pytest.mark.parametrize("keep_folders", [False, True])
def test_keys_escaping_the_target_are_refused(bucket, argv, tmp_path: Path, capsys, keep_folders: bool) -> None:
    evil = ["../x.tif", "/etc/x.tif", "a/../../b.tif", "./c.tif"]
    name = bucket({**dict.fromkeys(evil, 10), "ok.tif": 10, "a/fine.tif": 10})
    more = ("--prefix", "", "--set", f"download_args.keep_folders={str(keep_folders).lower()}")
    assert dl.main(argv(name, *more)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: refused 4 keys that would be written outside the target folder")
    assert all(key in err[0] for key in evil)
    expected = {"ok.tif", "a/fine.tif" if keep_folders else "fine.tif", dl.MANIFEST}
    assert files_under(tmp_path / "data" / "raw").keys() == expected
    # Nothing anywhere else: the test folder holds only the settings and the raw folder.
    assert set(files_under(tmp_path)) == {"settings.json"} | {f"data/raw/{f}" for f in expected}


# --- bad input and faults --------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_missing_bucket(argv, tmp_path: Path, capsys) -> None:
    missing = f"test-missing-{uuid.uuid4().hex[:12]}"
    assert dl.main(argv(missing, "--prefix", "")) == 1
    assert f"bucket '{missing}' does not exist" in one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_nothing_matches(bucket, argv, tmp_path: Path, capsys) -> None:
    name = bucket(SCENE)
    assert dl.main(argv(name, "--prefix", "scenes/", "--set", "download_args.pattern=*.jp2")) == 1
    line = one_error_line(capsys)
    assert "nothing under" in line and "'*.jp2'" in line and "a/tile_1.tif" in line
    assert dl.main(argv(name, "--prefix", "nowhere/")) == 1
    assert "is empty" in one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_unreachable_endpoint_fails_fast(stage_argv, tmp_path: Path, capsys) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    code = dl.main([*stage_argv, "--set", f"download_args.endpoint_url={endpoint}", "--bucket", "any-bucket"])
    assert code == 1
    assert time.monotonic() - start < 10
    assert f"cannot reach {endpoint}" in one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_an_endpoint_that_never_answers_fails_in_seconds(stage_argv, tmp_path: Path, capsys) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:  # accepts, reads, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        code = dl.main([*stage_argv, "--set", f"download_args.endpoint_url={endpoint}", "--bucket", "any-bucket"])
        elapsed = time.monotonic() - start
    assert code == 1
    assert elapsed < 10
    assert one_error_line(capsys) == (
        f"error: {endpoint} accepted the connection but did not answer a listing within 5 s: check that "
        "download_args.endpoint_url is an S3 endpoint and that it is up"
    )
    assert not (tmp_path / "data").exists()


def test_a_plain_http_server_is_not_taken_for_s3(stage_argv, tmp_path: Path, capsys) -> None:
    port = free_port()
    (tmp_path / "www").mkdir()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        code = dl.main([*stage_argv, "--set", f"download_args.endpoint_url={endpoint}", "--bucket", "any-bucket"])
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert code == 1
    assert one_error_line(capsys) == (
        f"error: {endpoint} answered a bucket listing with HTTP 404 and no S3 error: it does not look like an S3 "
        "endpoint: check download_args.endpoint_url (the address of MinIO, Ceph or S3 itself)"
    )


def test_no_credentials_says_how_to_give_them(bucket, argv, monkeypatch, capsys) -> None:
    name = bucket(SCENE)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert dl.main(argv(name, "--prefix", "scenes/")) == 1
    line = one_error_line(capsys)
    for hint in ("AWS_ACCESS_KEY_ID", "~/.aws/credentials", "download_args.profile", "download_args.anonymous=true"):
        assert hint in line


def test_unknown_profile(bucket, argv, capsys) -> None:
    assert dl.main(argv("some-bucket", "--set", "download_args.profile=nosuchprofile")) == 1
    assert "AWS profile 'nosuchprofile' not found" in one_error_line(capsys)


def test_profile_from_a_credentials_file(bucket, argv, monkeypatch, tmp_path: Path) -> None:
    name = bucket({"t/tile_1.tif": 10})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[team]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    assert dl.main(argv(name, "--prefix", "t/", "--set", "download_args.profile=team")) == 0
    assert sorted(data_files(tmp_path / "data" / "raw")) == ["tile_1.tif"]


def test_anonymous_reads_a_public_bucket_without_credentials(bucket, argv, monkeypatch, tmp_path: Path) -> None:
    name = bucket({"t/tile_1.tif": 1000, "t/tile_2.tif": 2000}, acl="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert dl.main(argv(name, "--prefix", "t/", "--set", "download_args.anonymous=true")) == 0
    assert sorted(data_files(tmp_path / "data" / "raw")) == ["tile_1.tif", "tile_2.tif"]


def test_anonymous_read_of_a_private_object_is_access_denied(bucket, argv, monkeypatch, tmp_path: Path, capsys):
    name = bucket({"t/tile_1.tif": 1000})  # private: moto refuses unsigned GETs
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert dl.main(argv(name, "--prefix", "t/", "--set", "download_args.anonymous=true")) == 1
    line = one_error_line(capsys)
    assert "1 of 1 file failed" in line and "access denied" in line
    assert data_files(tmp_path / "data" / "raw") == {}


@contextmanager
def iam_enforced(endpoint: str) -> Iterator[None]:
    """Make moto_server check signatures and IAM policies (moto's reset-auth API); undone after."""

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=5).close()

    reset_auth("0")
    try:
        yield
    finally:
        reset_auth("inf")


@pytest.fixture
def iam_user(moto_endpoint: str) -> tuple[str, str]:
    """Access key and secret of a moto IAM user who may list only some other bucket."""
    iam = boto3.client(
        "iam",
        endpoint_url=moto_endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    user = f"user-{uuid.uuid4().hex[:12]}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::someone-elses"}],
    }
    iam.put_user_policy(UserName=user, PolicyName="elsewhere", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("unknown key", "the access key is not known"),
        ("wrong secret", "the secret key does not match the access key"),
        ("no permission", "access denied to s3://"),
    ],
)
def test_wrong_credentials(bucket, argv, moto_endpoint, iam_user, monkeypatch, tmp_path: Path, capsys, which, words):
    name = bucket(SCENE)
    key_id, secret = iam_user
    key_id = "AKIAUNKNOWN000000000" if which == "unknown key" else key_id
    secret = SECRET_KEY if which == "wrong secret" else secret
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with iam_enforced(moto_endpoint):
        code = dl.main(argv(name, "--prefix", "scenes/"))
    assert code == 1
    line = one_error_line(capsys)
    assert words in line
    assert secret not in line and key_id not in line
    assert not (tmp_path / "data").exists()


def test_not_enough_disk_space(bucket, argv, monkeypatch, tmp_path: Path, capsys) -> None:
    name = bucket(SCENE)
    real = dl.shutil.disk_usage

    def tiny_disk(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(dl.shutil, "disk_usage", tiny_disk)
    assert dl.main(argv(name, "--prefix", "scenes/")) == 1
    assert "not enough disk space: the download needs 11.7 KiB" in one_error_line(capsys)
    assert not (tmp_path / "data" / "raw").exists()


def test_no_bucket_and_no_terminal_names_the_missing_value(argv, tmp_path: Path, capsys) -> None:
    assert not sys.stdin.isatty()
    assert dl.main(argv(None)) == 1
    line = one_error_line(capsys)
    assert "download_args.bucket is not set" in line and "--bucket" in line
    assert not (tmp_path / "data").exists()


def test_dry_run_lists_and_transfers_nothing(bucket, argv, tmp_path: Path, capsys) -> None:
    name = bucket(SCENE)
    more = ("--prefix", "scenes/", "--dry-run", "--set", "download_args.labels_pattern=*.geojson")
    assert dl.main(argv(name, *more)) == 0
    out = capsys.readouterr().out
    for key in ("scenes/a/tile_1.tif", "scenes/a/tile_2.tif", "scenes/b/tile_3.tif", "scenes/labels/roofs.geojson"):
        assert f"s3://{name}/{key} -> " in out
    assert "notes.txt" not in out and "tile_9" not in out
    assert "dry run: 4 files, 12.4 KiB to download" in out
    assert not (tmp_path / "data").exists()


def test_verbose_log_shows_requests_but_no_credentials(bucket, argv, capsys) -> None:
    name = bucket({"t/tile_1.tif": 10})
    args = [a for a in argv(name, "--prefix", "t/") if a != "--quiet"]
    assert dl.main([*args, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "DEBUG: Sending http request" in err  # botocore's debug log does show the headers...
    assert ACCESS_KEY not in err and SECRET_KEY not in err  # ...with the credentials taken out
    assert "Credential=****/" in err
    assert "download: 1 downloaded, 0 skipped, 0 failed" in err


# --- interactive -----------------------------------------------------------------------------------


class Answers:
    """A prompt function that answers from a list and records the prompts."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.answers:
            raise AssertionError(f"unexpected prompt: {prompt!r}")
        return self.answers.pop(0)


def test_menu_walks_into_a_folder_and_confirms(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket(SCENE)
    shown: list[str] = []
    # bucket; open 2) scenes/; 3) labels/ then go back up; open a/ by name; download here; confirm
    ask = Answers(name, "2", "3", "..", "a", "", "y")
    summary = dl.download_prefix(options(moto_endpoint, None), data_tree, ask=ask, say=shown.append)
    assert ask.answers == []
    assert ask.prompts[0].startswith("S3 bucket")
    assert ask.prompts[-1] == "Download 2 files (7.8 KiB)? [y/N] "
    text = "\n".join(shown)
    assert f"s3://{name}/\n    1) other/\n    2) scenes/\n" in text
    assert f"s3://{name}/scenes/\n    1) a/\n    2) b/\n    3) labels/\n" in text
    assert "4 files match *.tif here and below, 13.7 KiB" in text  # at the root
    assert "2 files match *.tif here and below, 7.8 KiB" in text  # in scenes/a/
    assert (summary.downloaded, summary.bytes) == (2, 8000)
    assert sorted(data_files(data_tree.raw)) == ["tile_1.tif", "tile_2.tif"]


@pytest.mark.parametrize("answers", [("q",), ("", "n")], ids=["quit", "decline"])
def test_menu_quit_or_decline_downloads_nothing(bucket, moto_endpoint, data_tree: DataTree, answers) -> None:
    name = bucket({"t/tile_1.tif": 10})
    shown: list[str] = []
    ask = Answers(*answers)
    assert dl.download_prefix(options(moto_endpoint, name), data_tree, ask=ask, say=shown.append) is None
    assert ask.answers == []
    assert shown[-1] == "nothing downloaded"
    assert not data_tree.raw.exists()


def test_menu_bad_choices_are_asked_again(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket({"t/tile_1.tif": 10, "u/readme.txt": 5})
    shown: list[str] = []
    ask = Answers("", f"s3://{name}", "7", "x", "2", "", "..", "1", "", "y")
    summary = dl.download_prefix(options(moto_endpoint, None), data_tree, ask=ask, say=shown.append)
    assert ask.answers == []
    assert "  no such choice: '7'" in shown and "  no such choice: 'x'" in shown
    assert "  nothing here to download: open a folder, or go up" in shown
    assert summary.downloaded == 1


def test_given_prefix_with_a_terminal_does_not_prompt(bucket, moto_endpoint, data_tree: DataTree) -> None:
    name = bucket({"t/tile_1.tif": 10})
    summary = dl.download_prefix(options(moto_endpoint, name, prefix="t/"), data_tree, ask=Answers())
    assert summary.downloaded == 1


def read_until(fd: int, text: str, buffer: bytearray, timeout: float = 20) -> None:
    """Read the pseudo-terminal until ``text`` appears in what was read."""
    deadline = time.monotonic() + timeout
    while text.encode() not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{text!r} not seen; got:\n{buffer.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"{text!r} not seen before the end; got:\n{buffer.decode(errors='replace')}")
            buffer.extend(chunk)


def test_interactive_run_in_a_pseudo_terminal(bucket, moto_endpoint, settings_file: Path, tmp_path: Path) -> None:
    name = bucket(SCENE)
    primary, secondary = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    command = [
        sys.executable,
        str(REPO / "download" / "download.py"),
        "--settings",
        str(settings_file),
        "--set",
        f"download_args.endpoint_url={moto_endpoint}",
    ]
    proc = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary, env=env, cwd=tmp_path)
    os.close(secondary)
    seen = bytearray()
    try:
        for expect, answer in [
            ("S3 bucket", name),
            ("2) scenes/", None),
            ("q to quit: ", "2"),
            ("1) a/", None),
            ("q to quit: ", "2"),
            ("1 file matches", None),
            ("q to quit: ", ""),
            ("? [y/N] ", "y"),
        ]:
            read_until(primary, expect, seen)
            if answer is not None:
                del seen[: seen.index(expect.encode()) + len(expect)]
                os.write(primary, answer.encode() + b"\r")
        code = proc.wait(timeout=30)
        try:
            while chunk := os.read(primary, 4096):
                seen.extend(chunk)
        except OSError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    assert code == 0, seen.decode(errors="replace")
    assert SECRET_KEY.encode() not in seen
    assert data_files(tmp_path / "data" / "raw") == {"tile_3.tif": payload("scenes/b/tile_3.tif", 4000)}
