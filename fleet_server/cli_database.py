"""``toco-fleet db`` and ``toco-fleet tokens``: commands that work offline on the fleet database
(``--data-dir`` or ``--db-url``), so the schema and the first admin token exist before the server
ever runs; and the database opening the other offline commands (``devices enroll``) share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from toco_core.cli_support import cli_errors, console
from toco_core.errors import ConfigError

DATA_DIR = typer.Option(Path("fleet-data"), help="the server's data directory (its fleet.db)")
DB_URL = typer.Option(None, "--db-url", help="SQLAlchemy URL, instead of {data-dir}/fleet.db (or TOCO_FLEET_DB_URL)")
db_app = typer.Typer(help="The fleet database's schema (Alembic revisions; `serve` also upgrades on start).",
                     no_args_is_help=True)


def open_database(data_dir: Path, db_url: str | None, create: bool = False):
    """The fleet database ``serve`` would open with these options, upgraded to this release. It must exist
    unless ``create`` (the first admin token is made before the server ever ran: the data dir is made too)."""
    from fleet_server.db import Database

    if create and not db_url:
        data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(data_dir, db_url, must_exist=not create)
    with opening(url):
        return Database(url)


def database_url(data_dir: Path, db_url: str | None, must_exist: bool) -> str:
    """The URL ``serve`` would open with these options. Raises ConfigError for a URL SQLAlchemy cannot
    parse, or a SQLite file that is missing (``must_exist``) or whose folder is missing: a mistyped
    --data-dir must not look like a new fleet."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from fleet_server.config import FleetSettings

    given: dict[str, Any] = {"db_url": db_url} if db_url else {}
    url = FleetSettings(data_dir=data_dir, **given).database_url
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {url!r}: {exc}", "give a SQLAlchemy URL, e.g. "
                          "postgresql+psycopg://user@host/fleet") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if must_exist and not path.exists():
            raise ConfigError(f"no fleet database at {path}", "check --data-dir / --db-url; `toco-fleet db upgrade` "
                              "or `toco-fleet serve` creates one")
        if not path.parent.is_dir():
            raise ConfigError(f"folder {path.parent} does not exist", "check --data-dir / --db-url")
    return url


@contextmanager
def opening(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached (driver missing, server down, file unreadable) into one ConfigError."""
    from sqlalchemy.exc import SQLAlchemyError

    from fleet_server.migrate import describe_url

    try:
        yield
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(f"cannot open the fleet database {describe_url(url)}: {reason}",
                          "check --data-dir / --db-url and that the database's driver is installed") from None


@db_app.command("upgrade")
@cli_errors
def db_upgrade(data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Bring the database to this release's schema: create it, adopt a pre-Alembic one, or upgrade."""
    from fleet_server.db import Database
    from fleet_server.migrate import describe_url

    url = database_url(data_dir, db_url, must_exist=False)
    with opening(url):
        db = Database(url)
    db.close()
    console.print(f"{describe_url(url)}: {db.schema.summary()}", soft_wrap=True, highlight=False)


@db_app.command("current")
@cli_errors
def db_current(data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Print the database's schema revision against this release's head; changes nothing."""
    from sqlalchemy import create_engine

    from fleet_server.migrate import describe_url, schema_state

    url = database_url(data_dir, db_url, must_exist=True)
    with opening(url):
        engine = create_engine(url)
        try:
            state = schema_state(engine)
        finally:
            engine.dispose()
    console.print(f"{describe_url(url)}: {state.summary()}", soft_wrap=True, highlight=False)


tokens_app = typer.Typer(help="API tokens of the HTTP API and dashboard (offline, on the database: works before "
                         "the server runs).", no_args_is_help=True)


@tokens_app.command("create")
@cli_errors
def tokens_create(role: str = typer.Option(..., help="viewer (read), operator (also change the fleet) or admin"),
                  name: str | None = typer.Option(None, help="who or what uses it, for `tokens list`"),
                  data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Make an API token and print it once (only its hash is stored)."""
    from fleet_server.auth import check_role, create_token
    from fleet_server.client_token import ENV
    from fleet_server.migrate import describe_url

    check_role(role)
    db = open_database(data_dir, db_url, create=True)
    try:
        token, view = create_token(db, role=role, name=name)
    finally:
        db.close()
    console.print(f"token {view['token_id']} ({view['role']}, {view['name']!r}) in {describe_url(str(db.engine.url))}; "
                  "shown once, keep it secret:", highlight=False, soft_wrap=True)
    print(token)
    console.print(f"use it with: export {ENV}=<token>   (or log in to the dashboard with it)", highlight=False,
                  soft_wrap=True)


@tokens_app.command("list")
@cli_errors
def tokens_list(data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """List the API tokens: id, name, role, when made, last used, revoked (never the secret)."""
    from fleet_server.auth import list_tokens

    db = open_database(data_dir, db_url)
    try:
        views = list_tokens(db)
    finally:
        db.close()
    when = lambda t: "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    t = Table("token", "name", "role", "created", "last used", "revoked")
    t.columns[0].no_wrap = True  # the id is what `tokens revoke` takes: copyable in one piece
    for v in views:
        t.add_row(v["token_id"], v["name"], v["role"], when(v["created_at"]), when(v["last_used_at"]),
                  when(v["revoked_at"]))
    console.print(t)


@tokens_app.command("revoke")
@cli_errors
def tokens_revoke(token_id: str = typer.Argument(..., help="the token's id, from `tokens list`"),
                  data_dir: Path = DATA_DIR, db_url: str | None = DB_URL) -> None:
    """Revoke an API token: its requests and its dashboard sessions are refused from now on."""
    from fleet_server.auth import revoke_token

    db = open_database(data_dir, db_url)
    try:
        view = revoke_token(db, token_id=token_id)
    finally:
        db.close()
    console.print(f"token {view['token_id']} ({view['name']!r}) revoked", highlight=False)


