"""Fixtures of the S3 tests: a moto S3 server that the tests start on 127.0.0.1 (no network
beyond this machine), and a fresh, emptied bucket on it per test with the fsspec options
that reach it."""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

# Credentials of the moto server (it accepts any), and no look-up elsewhere: botocore would
# otherwise read ~/.aws and probe the EC2 metadata address, which hangs without a network.
_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_SECURITY_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
_buckets = itertools.count()


@dataclass
class Bucket:
    """An S3 bucket on the local moto server: its name, the fsspec options (``--storage-options``)
    that reach it, and an ``s3fs`` filesystem on it for the tests' own reads and writes."""

    name: str
    options: dict[str, Any]
    fs: Any = field(repr=False)

    @property
    def options_json(self) -> str:
        """``options`` as the JSON text of ``--storage-options``."""
        return json.dumps(self.options)

    def url(self, key: str) -> str:
        """``s3://BUCKET/key``."""
        return f"s3://{self.name}/{key}"

    def keys(self) -> list[str]:
        """Every object in the bucket, as ``BUCKET/key``."""
        self.fs.invalidate_cache()
        return sorted(self.fs.find(self.name))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 (a free port), stopped after the session; the
    tests that need it are skipped where moto is not installed."""
    moto_server = pytest.importorskip("moto.server", reason="the s3:// tests need moto[server] (the 'test' extra)")
    pytest.importorskip("s3fs", reason="the s3:// tests need s3fs (the 'test' extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    requests_log = logging.getLogger("werkzeug")  # a line per request otherwise
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        requests_log.setLevel(level)


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A new, empty bucket on the server, the AWS environment pointing at nothing else; the
    bucket is removed with all it holds after the test."""
    import s3fs

    for key, value in _AWS_ENV.items():
        monkeypatch.setenv(key, value)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    bucket = Bucket(f"recon3d-test-{next(_buckets)}", options, s3fs.S3FileSystem(**options))
    bucket.fs.mkdir(bucket.name)
    yield bucket
    bucket.fs.rm(bucket.name, recursive=True)


class _Requests(logging.Handler):
    """The requests the moto server answered: werkzeug logs ``"GET /bucket/key HTTP/1.1" 200 -``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"\x1b\[[\d;]*m", "", record.getMessage())  # werkzeug colours some lines
        found = re.search(r'"(\w+) (\S+) HTTP/[\d.]+" (\d+)', text)
        if found:
            self.lines.append((found.group(1), found.group(2), int(found.group(3))))

    def gets(self, array: str) -> list[int]:
        """The statuses of the GETs of ``array``'s chunk objects (200 whole, 206 a range)."""
        return [status for method, path, status in self.lines if method == "GET" and f"/{array}/c/" in path]


@pytest.fixture
def requests() -> Iterator[_Requests]:
    log = logging.getLogger("werkzeug")
    handler, level, propagate = _Requests(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


@pytest.fixture
def scan_url(s3, monkeypatch, request) -> str:
    """A sharded scan written to the bucket by the test module's ``SIMULATE`` command line."""
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    url = s3.url("scan.zarr")
    from pipeline.cli import main

    assert main([*request.module.SIMULATE, "--out", url]) == 0
    return url
