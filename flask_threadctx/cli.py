"""``flask threadctx``: the extension's commands, added to every app it is registered on."""

from __future__ import annotations

import json
import time
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup
from flask.cli import ScriptInfo

from .store import store_of
from .store import TASK_STATES
from .store import tree

if t.TYPE_CHECKING:
    from .store import Record
    from .store import TaskReader
    from .store import TaskStore

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


def _store() -> TaskStore:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    store = store_of(app)
    if store is None:
        raise click.UsageError(
            f"{app.name!r} has no task store to read: set 'THREADCTX_TASK_STORE' (see the"
            " Monitoring page of the docs)."
        )
    return store


@threadctx_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_command(as_json: bool) -> None:
    """Count the app's tasks by state, in every process."""
    counts = _store().counts()
    if as_json:
        click.echo(json.dumps(counts))
        return
    for name, count in counts.items():
        click.echo(f"{name:<10} {count:>8}")


@threadctx_cli.command("tasks")
@click.option("--state", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@click.option("--name", help="Only tasks of this function (its __qualname__).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one task per line.")
def tasks_command(state: str | None, name: str | None, limit: int, as_json: bool) -> None:
    """List the tasks submitted last, newest first."""
    records = _store().recent(state=state, name=name, limit=limit)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.as_dict()))
        return
    if not records:
        click.echo("No tasks.")
        return
    click.echo(f"{'ID':<24} {'STATE':<10} {'SUBMITTED':<19} {'WAITED':>8} {'RAN':>8}  NAME")
    for record in records:
        click.echo(_line(record))


@threadctx_cli.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(task_id: str, as_json: bool) -> None:
    """Show one task, with the tasks it submitted, and theirs."""
    store = _store()
    record = store.get(task_id)
    if record is None:
        raise click.ClickException(f"No task {task_id!r} in the store (or it expired).")
    if as_json:
        click.echo(json.dumps(tree(store, record)))
        return
    for field, value in record.as_dict().items():
        if value is not None and field not in ("progress", "waited", "ran"):
            click.echo(f"{field:<13} {value}")
    if record.progress is not None:
        done, total, note = record.progress
        click.echo(
            f"{'progress':<13} {done:g}{'' if total is None else f' of {total:g}'}"
            f"{'' if note is None else f' ({note})'}"
        )
    children = store.children(task_id)
    if children:
        click.echo("children:")
        _echo_tree(store, children, "  ")


def _echo_tree(store: TaskReader, records: list[Record], indent: str) -> None:
    for record in records:
        click.echo(f"{indent}{record.id} {record.state} {record.name}")
        _echo_tree(store, store.children(record.id), indent + "  ")


def _line(record: Record) -> str:
    data = record.as_dict()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.submitted_at))
    waited, ran = (_seconds(data[k]) for k in ("waited", "ran"))
    return f"{record.id:<24} {record.state:<10} {when:<19} {waited:>8} {ran:>8}  {record.name}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"
