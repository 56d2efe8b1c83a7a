"""A throw-away PostgreSQL cluster for the fleet tests (PostgreSQL 15 from Debian's ``postgresql`` package).

``initdb`` and ``pg_ctl`` refuse to run as root, which the tests and CI are, so they run through
``runuser`` as an unprivileged system user created here if absent. The cluster listens on a free
port of 127.0.0.1 only, trusts local connections (it lives for one test session in a temp dir) and
is stopped and deleted afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port

PG_USER = "toco-pg"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine, or no way to run them (not root and not the user)."""


def pg_bin() -> Path | None:
    """The directory holding initdb/pg_ctl: $TOCO_PG_BIN, else the newest /usr/lib/postgresql/*/bin. None if absent."""
    env = os.environ.get("TOCO_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster: ``port`` on 127.0.0.1, superuser ``user`` (trust auth)."""

    port: int
    user: str
    bindir: Path

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this cluster (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its SQLAlchemy URL. Raises CalledProcessError on failure."""
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def execute_script(self, database: str, sql: str) -> None:
        """Run ``sql`` (several statements) on ``database``, stopping at the first error (CalledProcessError)."""
        self._psql(database, sql)

    def _psql(self, database: str, sql: str) -> None:
        subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                        "-p", str(self.port), "-U", self.user, "-d", database], input=sql.encode(),
                       check=True, capture_output=True, timeout=60)


def _ensure_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               PG_USER], capture_output=True)
        if made.returncode != 0:  # another test process may have made it meanwhile
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"cannot create the user {PG_USER} the PostgreSQL test clusters run as: "
                                   f"{made.stderr.decode(errors='replace').strip()}") from None


def _as_pg_user(argv: list[str], **kw) -> subprocess.CompletedProcess:
    # root: drop to the unprivileged user; anyone else runs the binaries as themselves
    prefix = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + argv, check=True, capture_output=True, timeout=120, **kw)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Start a throw-away cluster; yields a PostgresCluster; stops it (fast) and deletes its directory.

    Raises PostgresUnavailable when PostgreSQL is not installed, CalledProcessError when it fails to start.
    """
    bindir = pg_bin()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL is not installed "
                                  "(Debian: apt-get install postgresql; `make system-deps`)")
    if os.geteuid() == 0:
        _ensure_user()
        user = PG_USER
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="toco-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        for p in (root, sockets):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    started = False
    try:
        _as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--encoding=UTF8",
                     "--no-sync", "--locale=C"])
        # fsync off: a test cluster need not survive a crash, and it makes DDL-heavy migration tests faster
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c synchronous_commit=off " \
               "-c full_page_writes=off"
        _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60",
                     "start"])
        started = True
        yield PostgresCluster(port=port, user=user, bindir=bindir)
    finally:
        if started:
            _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
