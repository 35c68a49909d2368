"""A throwaway PostgreSQL server for the tests and the store benchmark (not a test module).

`PostgresServer` runs the Debian binaries (/usr/lib/postgresql/<version>/bin) on a data
directory and unix socket under one temporary directory, listening on 127.0.0.1 on a free
port. `initdb` and `postgres` refuse to run as root, so under root they run as the
`postgres` OS user (set in the child, like `runuser`, but with the server as our direct child
so that signals reach it) and the directory is handed to that user. Each
`new_database()` creates a database owned by a non-superuser role with a password (as a
proxy would connect in production) and returns its postgresql:// URL. Every wait is
bounded; `stop` shuts the server down (fast, then immediate, then killed) and removes the
directory.

The pytest fixtures: `postgres_server` (one per session) and `postgres_url` (a fresh
database per test). Both skip, saying why, only when the binaries are not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
OWNER = "flywheel"  # the role Flywheel connects as: owns its databases, may create roles, is no superuser
PASSWORD = "flywheel-test"
# A test server trades durability for speed; the benchmark passes `durable=True`.
_FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed (apt-get install postgresql)."""


def find_bin_dir() -> Path:
    """The newest installed /usr/lib/postgresql/<version>/bin holding initdb and postgres."""
    found = [Path(d) for d in glob.glob(_BIN_GLOB) if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists()]
    if not found:
        raise PostgresUnavailable(f"no PostgreSQL server binaries under {_BIN_GLOB} (apt-get install postgresql)")
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, durable: bool = False):
        self.bin_dir = find_bin_dir()
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self._log = None
        self._as_root = os.geteuid() == 0

    def _as_server_user(self) -> dict:
        """Popen arguments that run the child as the postgres OS user when we are root."""
        return {"user": "postgres", "group": "postgres", "extra_groups": [], "cwd": self.root} if self._as_root \
            else {"cwd": self.root}

    def start(self) -> "PostgresServer":
        try:
            self.socket_dir.mkdir()
            if self._as_root:
                shutil.chown(self.root, "postgres", "postgres")
                shutil.chown(self.socket_dir, "postgres", "postgres")
            subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                           check=True, capture_output=True, timeout=_START_TIMEOUT_S, **self._as_server_user())
            self._log = open(self.root / "server.log", "wb")  # a file, not a pipe: a full pipe would stall the server
            settings = [] if self.durable else [arg for s in _FAST for arg in ("-c", s)]
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-k", str(self.socket_dir),
                 "-h", "127.0.0.1", "-p", str(self.port), "-c", "max_connections=200", *settings],
                stdout=subprocess.DEVNULL, stderr=self._log, **self._as_server_user())
            self._wait_ready()
            self._admin(f"CREATE ROLE {OWNER} LOGIN CREATEROLE PASSWORD '{PASSWORD}'")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {(self.root / 'server.log').read_text()[-2000:]}")
            ready = subprocess.run([str(self.bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir),
                                    "-p", str(self.port)], timeout=5)
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"postgres did not accept connections within {_START_TIMEOUT_S:g} s")

    def _admin(self, sql: str) -> None:
        """Run `sql` as the superuser over the unix socket (trusted), outside a transaction."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=10) as con:
            con.execute(sql)

    def new_database(self) -> str:
        """A fresh database owned by the Flywheel role; its postgresql:// URL (password auth over TCP)."""
        name = f"flywheel_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name} OWNER {OWNER}")
        return f"postgresql://{OWNER}:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    def admin_url(self, url: str) -> str:
        """The superuser's URL (unix socket) for the database of `url`: for tests that inspect it from outside."""
        return f"postgresql:///{url.rsplit('/', 1)[1]}?host={self.socket_dir}&port={self.port}&user=postgres"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT: fast shutdown (abort sessions); SIGQUIT: immediate; then kill
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
                self.process.send_signal(sig)
                try:
                    self.process.wait(_STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = PostgresServer()
    except PostgresUnavailable as missing:
        pytest.skip(str(missing))
    with server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    return postgres_server.new_database()


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_db(request, tmp_path) -> str:
    """A fresh store of each kind, as `[proxy] db` names it: a DuckDB file path, then a PostgreSQL URL."""
    if request.param == "duckdb":
        return str(tmp_path / "flywheel.duckdb")
    return request.getfixturevalue("postgres_url")
