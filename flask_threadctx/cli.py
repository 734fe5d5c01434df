"""``flask threadctx``: the extension's commands, added to every app it is registered on."""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import datetime
import json
import sqlite3
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup
from flask.cli import ScriptInfo

from .app_state import app_state
from .monitor import store_description
from .stores import flush
from .stores import store_of
from .stores.base import summary
from .stores.base import TASK_STATES
from .stores.base import tree

if t.TYPE_CHECKING:
    from .future import TaskFuture
    from .stores.base import Record
    from .stores.base import TaskReader
    from .stores.base import TaskStore

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
    from .backends.celery.worker import serve

    if ctx.args in (["--help"], ["-h"]):
        # Celery prints its own options next, under its own usage line.
        click.echo(f"{ctx.get_help()}\n\nThe options of 'celery worker':\n")
    serve(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        ctx.find_object(ScriptInfo),
        list(ctx.args),
    )


@contextlib.contextmanager
def _store() -> cabc.Iterator[TaskStore]:
    """The app's store, for the block; a store that cannot be read is one line of error."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    store = store_of(app)
    if store is None:
        raise click.UsageError(
            f"{app.name!r} has no task store to read: set 'THREADCTX_TASK_STORE' (see the"
            " Monitoring page of the docs)."
        )
    try:
        yield store
    except _store_errors() as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise click.ClickException(
            f"Cannot read the task store, {store_description(app)}: {reason}"
        ) from None


def _store_errors() -> tuple[type[Exception], ...]:
    """What a store raises when it cannot be reached or read."""
    errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)
    try:
        import redis
    except ImportError:
        return errors
    return (*errors, redis.RedisError)


@threadctx_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_command(as_json: bool) -> None:
    """Count the app's tasks by state, in every process."""
    with _store() as store:
        counts = store.counts()
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
    with _store() as store:
        records = store.recent(state=state, name=name, limit=limit)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.as_dict()))
        return
    if not records:
        click.echo("No tasks.")
        return
    width = max(2, *(len(record.id) for record in records))
    click.echo(
        f"{'ID':<{width}}  {'STATE':<9}  {'SUBMITTED':<19}  {'WAITED':>10}  {'RAN':>10}  NAME"
    )
    for record in records:
        click.echo(_line(record, width))


@threadctx_cli.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(task_id: str, as_json: bool) -> None:
    """Show one task, with the tasks it submitted, and theirs."""
    with _store() as store:
        record = store.get(task_id)
        if record is None:
            raise click.ClickException(f"No task {task_id!r} in the store (or it expired).")
        if as_json:
            click.echo(json.dumps(tree(store, record)))
            return
        data = record.as_dict()
        for field in _SHOWN:
            value = data.get(field)
            if value is None or (field == "retries" and not value):
                continue
            if field.endswith("_at"):
                value = _when(value)
            elif field in ("waited", "ran"):
                value = _seconds(value)
            elif field == "progress":
                value = _progress(record)
            click.echo(f"{field:<13} {value}")
        children = store.children(task_id)
        if children:
            click.echo("children:")
            _echo_tree(store, children, "  ")


@threadctx_cli.command("cancel")
@click.argument("task_id")
def cancel_command(task_id: str) -> None:
    """Stop a task: one that has not started never runs; a running one is asked to stop, at
    its next check. Prints 'stopped', or 'already finished' for a task that had ended (exit
    status 0 for both); an unknown id, or a task this process cannot reach, is an error (1)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with _store():
        try:
            stopped = app_state(app, "cancel").extension.cancel_task(task_id)
        except (LookupError, RuntimeError, TimeoutError) as error:
            raise click.ClickException(str(error)) from None
    click.echo("stopped" if stopped else "already finished")


@threadctx_cli.command("rerun")
@click.argument("task_id")
def rerun_command(task_id: str) -> None:
    """Run a task again, with its first run's arguments and request, as a new task linked to
    it. Prints the new task's id.

    A Celery task goes to the workers: the command ends at once (exit status 0). A thread task
    runs in this command's process, whose threads end with it: the command waits for it and
    prints how it ended, 'succeeded' (0) or its state and error (3); Ctrl+C asks it to stop.
    A task that cannot be re-run (unknown, not rerunnable, its function gone) is an error (1).
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    extension = app_state(app, "rerun").extension
    with _store():
        try:
            future = extension.rerun(task_id)
        except (LookupError, ValueError, RuntimeError) as error:
            raise click.ClickException(str(error)) from None
    new_id = future.task.id
    click.echo(new_id)
    if future.task.backend == "celery":
        return
    try:
        click.echo("A thread task: it runs in this process, which waits for it to end.", err=True)
        failure = _ending(future)
    except KeyboardInterrupt:
        extension.cancel_task(new_id)
        click.echo(f"Interrupted: asked task {new_id} to stop.", err=True)
        failure = _ending(future)  # at its next check; a second Ctrl+C leaves at once
    flush(app)  # the store has its end before the process does
    if failure is not None:
        click.echo(f"{future.task.state}: {summary(failure)}")
        raise click.exceptions.Exit(3)
    click.echo("succeeded")


def _ending(future: TaskFuture[object]) -> Exception | None:
    """Wait for ``future``: ``None`` if its task succeeded, else why it did not."""
    try:
        future.result()
    except Exception as error:
        return error
    return None


_SHOWN = (
    *("id", "name", "state", "parent_id", "rerun_of", "request", "submitted_at", "started_at"),
    *("finished_at", "redelivery_at", "due_at", "retries", "waited", "ran", "progress"),
    *("error", "process", "backend"),
)
"""What ``show`` prints of a record, in this order, when set: never its arguments or result."""


def _echo_tree(store: TaskReader, records: list[Record], indent: str) -> None:
    for record in records:
        click.echo(f"{indent}{record.id} {record.state} {record.name}")
        _echo_tree(store, store.children(record.id), indent + "  ")


def _line(record: Record, width: int) -> str:
    data = record.as_dict()
    when = _when(record.submitted_at, "seconds").replace("T", " ")[:19]
    waited, ran = (_seconds(data[k]) for k in ("waited", "ran"))
    return (
        f"{record.id:<{width}}  {record.state:<9}  {when:<19}  {waited:>10}  {ran:>10}"
        f"  {record.name}"
    )


def _when(at: float, timespec: str = "milliseconds") -> str:
    """``at`` in the local time zone, in ISO 8601 with its offset."""
    return datetime.datetime.fromtimestamp(at).astimezone().isoformat(timespec=timespec)


def _seconds(value: float | None) -> str:
    """A duration as people read it: ``0.120 s``, ``30.5 s``, ``2 min 5 s``, ``1 h 3 min``."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.3f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _progress(record: Record) -> str:
    assert record.progress is not None
    done, total, note = record.progress
    return (
        f"{done:g}{'' if total is None else f' of {total:g}'}{'' if note is None else f' ({note})'}"
    )
