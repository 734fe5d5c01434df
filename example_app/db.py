"""SQLite access, as in the Flask tutorial: one connection per app context, closed at its end.

Every task runs in its own app context, so it opens and closes its own connection here too.
"""

from __future__ import annotations

import sqlite3

import click
from flask import current_app
from flask import Flask
from flask import g


def get_db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = sqlite3.connect(current_app.config["DATABASE"], timeout=10)
        g.db.row_factory = sqlite3.Row
        g.db.execute("PRAGMA journal_mode=WAL")
    db: sqlite3.Connection = g.db
    return db


def close_db(exc: BaseException | None = None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def init_db() -> None:
    with current_app.open_resource("schema.sql", "r", encoding="utf-8") as f:
        get_db().executescript(f.read())


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables, deleting every order and receipt already there."""
    init_db()
    click.echo(
        f"Initialized the database at {current_app.config['DATABASE']} (any earlier data is gone)."
    )


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
