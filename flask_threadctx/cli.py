"""``flask threadctx``: the extension's commands, added to every app it is registered on."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup
from flask.cli import ScriptInfo

threadctx_cli = AppGroup("threadctx", help="Flask-ThreadCtx: tasks and their workers.")


@threadctx_cli.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a Celery worker for this app's tasks. Any options are those of 'celery worker',
    listed below, for example '--concurrency 4 -Q heavy'.

    Each worker process makes its own app from the app's factory, as the web processes do.
    """
    from .celery_backend import serve

    if ctx.args in (["--help"], ["-h"]):
        # Celery prints its own options next, under its own usage line.
        click.echo(f"{ctx.get_help()}\n\nThe options of 'celery worker':\n")
    serve(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        ctx.find_object(ScriptInfo),
        list(ctx.args),
    )
