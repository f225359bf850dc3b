"""A Google Cloud Storage emulator on loopback, for tests of `gs://` paths without a cloud
(and, in the S3 section at the end, moto's S3 server for `s3://` paths).

The emulator is the `gcp-storage-emulator` package (a real HTTP server that speaks GCS's
JSON API), started as its own process on a free 127.0.0.1 port, storing its objects under a
temporary folder, with one header added that real GCS sends (see `serve`). Every client
is pointed at it by environment variables, so a training run launched as a subprocess
with `os.environ` (or `GcsEmulator.env`) sees the same buckets:

- `STORAGE_EMULATOR_HOST`: the endpoint of gcsfs (what `etils.epath` uses for `gs://`) and
  of google-cloud-storage (Orbax lists checkpoint steps with it), with anonymous credentials.
- `TENSORSTORE_GCS_HTTP_URL`: the endpoint of tensorstore's `gcs` kvstore, through which
  Orbax writes and reads array chunks; `GOOGLE_AUTH_TOKEN_FOR_TESTING`: the bearer token
  tensorstore then sends instead of looking for Google credentials.
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: otherwise gcsfs asks the storage-control gRPC
  API, which the emulator lacks, whether a bucket is hierarchical (a warning per call).
- `GOOGLE_CLOUD_PROJECT`: a google-cloud-storage client needs a project name.

Use in a test module (pytest finds fixtures by name, so import both):

    from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401

    def test_x(gcs_bucket):  # noqa: F811
        workdir = f"{gcs_bucket}/run"   # "gs://<fresh empty bucket>/run"

`gcs_emulator` is one server per test session (per xdist worker); it sets the variables
above in `os.environ` for the rest of that session (they matter only to `gs://` paths).
`gcs_bucket` is a new empty bucket for each test.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

_HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((_HOST, 0))
        return s.getsockname()[1]


class GcsEmulator:
    """One `gcp-storage-emulator` process on loopback; `env` points clients at it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.port = _free_port()
        self.url = f"http://{_HOST}:{self.port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "sft-jax-test",
        }
        self._process: subprocess.Popen | None = None
        self._names = itertools.count()

    def start(self, timeout_s: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "emulator.log", "wb")  # noqa: SIM115 (closed with the process)
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(self.root / "data"), str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the GCS emulator did not start on {self.url}: "
                    + (self.root / "emulator.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.1)

    def new_bucket(self, prefix: str = "bucket") -> str:
        """Create an empty bucket; returns its URL, `gs://<name>`."""
        prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "bucket"
        name = f"{prefix}-{os.getpid()}-{next(self._names)}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={self.env['GOOGLE_CLOUD_PROJECT']}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200, r.read()
        return f"gs://{name}"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def serve(data_dir: str, port: int) -> None:
    """Run the emulator (this file's `__main__`), adding the one response header real GCS
    sends and it lacks: `x-goog-generation` on object downloads. tensorstore takes an
    object's generation from it and makes its next write of that object conditional on it
    (OCDBT rewrites its manifest that way); without it that write fails with "Malformed
    StorageGeneration"."""
    import logging

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        except NotFound:
            pass  # the handler answers 404
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation  # before the server module builds its routes
    from gcp_storage_emulator.server import create_server

    logging.basicConfig(level=logging.CRITICAL)
    create_server(_HOST, port, in_memory=False, data_dir=data_dir).run()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> GcsEmulator:
    """A running emulator, with `os.environ` pointing every client at it."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs_emulator"))
    emulator.start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in emulator.env.items():
            env.setenv(key, value)
        yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator, request) -> str:
    """A fresh empty bucket in the emulator, as `gs://<name>` (no trailing slash)."""
    return gcs_emulator.new_bucket(request.node.name)


# ---- S3: moto's server on loopback ----------------------------------------------------
#
# moto's real S3 HTTP server (what `moto_server` and `ThreadedMotoServer` run), in a thread
# of the test process on a free 127.0.0.1 port: no mock is patched into any client, every
# request goes over a socket. Clients are pointed at it by environment variables, which
# subprocesses inherit (`S3Server.env`):
#
# - `AWS_ENDPOINT_URL_S3` (and `AWS_ENDPOINT_URL`): botocore's endpoint setting, which
#   aiobotocore, and so s3fs (what `etils.epath` and fsspec use for `s3://`), and boto3 read.
# - `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`: dummy credentials
#   and a region, so no client looks for real ones; `AWS_CONFIG_FILE` and
#   `AWS_SHARED_CREDENTIALS_FILE` name nothing, so a developer's ~/.aws (a profile's
#   endpoint or role) cannot override them.
#
# fsspec keeps one S3FileSystem per set of arguments, and epath one per protocol, each
# holding the endpoint it was made with: both caches are emptied when the server starts
# and stops, so no test talks to a server of another session or to real S3.
#
#     from tests.storage_emulator import s3_bucket, s3_server  # noqa: F401
#
#     def test_x(s3_bucket):  # noqa: F811
#         workdir = f"{s3_bucket}/run"   # "s3://<fresh empty bucket>/run"


class S3Server:
    """moto's S3 server in a thread on loopback; `env` points clients at it.

    It is `ThreadedMotoServer`'s server (moto's WSGI app and request handler under
    werkzeug), built here to count `object_bytes_served`: the bytes of object bodies sent
    (GETs without a query; listings have one), so a test can check what a reader fetched."""

    def __init__(self):
        self.url = ""
        self.env: dict[str, str] = {}
        self.object_bytes_served = 0
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    def _counting(self, app):
        def counted(environ, start_response):
            body = app(environ, start_response)
            if environ["REQUEST_METHOD"] != "GET" or environ.get("QUERY_STRING"):
                yield from body
                return
            for chunk in body:
                with self._lock:
                    self.object_bytes_served += len(chunk)
                yield chunk

        return counted

    def start(self) -> None:
        import logging

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request else
        app = self._counting(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            _HOST, 0, app, threaded=True, request_handler=MotoRequestHandler
        )  # port 0: a free one
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://{_HOST}:{self._server.server_port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def new_bucket(self, prefix: str = "bucket") -> str:
        """Create an empty bucket; returns its URL, `s3://<name>`."""
        import boto3

        prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "bucket"
        name = f"{prefix}-{os.getpid()}-{next(self._names)}"
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


def forget_s3_clients() -> None:
    """Drop the S3 file systems fsspec and epath cached, with the endpoint they were made
    with; the next `s3://` access builds one from the environment as it is now."""
    import s3fs
    from etils.epath import backend

    s3fs.S3FileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """A running S3 server, with `os.environ` pointing every S3 client at it."""
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(key, raising=False)
        for key, value in server.env.items():
            env.setenv(key, value)
        forget_s3_clients()
        yield server
    forget_s3_clients()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, request) -> str:
    """A fresh empty bucket in the S3 server, as `s3://<name>` (no trailing slash)."""
    return s3_server.new_bucket(request.node.name)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
