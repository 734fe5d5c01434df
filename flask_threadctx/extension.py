"""The Flask-facing extension object: registration, configuration, and the task API."""

from __future__ import annotations

import time
import typing as t

from .app_state import app_state
from .app_state import AppState
from .app_state import KEY
from .backends import load
from .backends import NAMES as BACKENDS
from .backends.pool import Pool
from .config import read_settings
from .config import shown
from .contexts.capture import active_app_context
from .stores import flush
from .stores.base import FINISHED_STATES
from .stores.base import stored_future
from .stores.stops import stop_in_its_process
from .task import Task

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask

    from .backends.base import Backend
    from .future import TaskFuture
    from .stores.feed import Recorder

P = t.ParamSpec("P")
R = t.TypeVar("R")


class ThreadContext:
    """Run functions in worker threads with the contexts of the code that submits them.

    Each app gets its own pool of worker threads, configured by the ``THREADCTX_*`` keys of its
    config. A task sees ``current_app``, a fresh ``g`` filled per ``THREADCTX_COPY_G``, and, when
    submitted during a request, ``request`` and a copy of ``session``. See :doc:`/contract`.

    :param app: Call :meth:`init_app` on this app now. Tasks submitted with no app context at
        all then go to this app's pool. Leave it out for the application factory pattern.

    .. code-block:: python

        threadctx = ThreadContext()

        def create_app():
            app = Flask(__name__)
            threadctx.init_app(app)
            return app
    """

    def __init__(self, app: flask.Flask | None = None) -> None:
        # Only the fallback for submits made outside any app context; everything else is
        # per app, in its ``AppState``.
        self._app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Read and check the ``THREADCTX_*`` config of ``app`` (filling in defaults) and give it
        a task pool. No threads start until the first submit.

        :raise RuntimeError: the extension is already registered on ``app``.
        :raise TypeError: a config key has a value of the wrong type.
        :raise ValueError: a config key has a value out of range, or ``THREADCTX_TASK_STORE``
            names a store that cannot be opened (a SQLite file in a folder that is missing or
            cannot be written, a ``unix://`` URL with no socket at its path).
        """
        if KEY in app.extensions:
            raise RuntimeError(
                f"A 'ThreadContext' is already registered on {app.name!r}. Call 'init_app'"
                " once per app."
            )
        settings = read_settings(app.config)
        pool = Pool(app, settings, self)
        backends: dict[str, Backend] = {"threads": pool}
        if settings.backend == "celery" or settings.celery_configured:
            backends["celery"] = load("celery")(app, settings, self, pool)
        # Before the app is registered: a store that cannot be opened leaves it as it was.
        state = AppState(self, settings, backends)
        if settings.task_store is not None:
            state.recorder = _recorder(app, state)
        app.extensions[KEY] = state
        if settings.metrics:
            try:
                from .metrics import MetricsRecorder
            except ImportError as error:
                raise RuntimeError(
                    f"'THREADCTX_METRICS' needs prometheus_client ({error}). Install it with"
                    " 'pip install Flask-ThreadCtx[prometheus]'."
                ) from None
            state.metrics = MetricsRecorder(app, pool)
        from .cli import threadctx_cli

        app.cli.add_command(threadctx_cli)

    @t.overload
    def submit(
        self,
        fn: t.Callable[P, cabc.Coroutine[t.Any, t.Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> TaskFuture[R]: ...

    @t.overload
    def submit(
        self, fn: t.Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[R]: ...

    def submit(
        self, fn: t.Callable[..., t.Any], /, *args: t.Any, **kwargs: t.Any
    ) -> TaskFuture[t.Any]:
        """Run ``fn(*args, **kwargs)`` in a worker thread of the current app's pool, in copies
        of the contexts that are active now. A coroutine function is run through
        :meth:`app.ensure_sync <flask.Flask.ensure_sync>`, so its future holds what it returns.

        :raise TypeError: ``fn`` is not callable.
        :raise QueueFull: ``THREADCTX_MAX_QUEUE`` tasks are already waiting (never for a
            running task's children).
        :raise RuntimeError: there is no app to submit to, or its pool was shut down.
        """
        if not callable(fn):
            raise TypeError(f"'submit' takes a callable to run, not {fn!r}.")
        app_ctx = active_app_context()
        app = self._current_app("submit") if app_ctx is None else app_ctx.app
        state: AppState | None = app.extensions.get(KEY)
        if state is None:
            state = app_state(app, "submit")  # raises the error that says what to do
        return state.default.submit(app, app_ctx, fn, args, kwargs)

    def _submit_to(
        self,
        name: str | None,
        options: cabc.Mapping[str, t.Any],
        fn: t.Callable[..., R],
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
    ) -> TaskFuture[R]:
        """Internal API of :class:`~flask_threadctx.Task`: submit to the backend ``name`` (the
        default one for ``None``) with its ``options``."""
        app_ctx = active_app_context()
        app = self._current_app("submit") if app_ctx is None else app_ctx.app
        state = app_state(app, "submit")
        backend = state.default if name is None else state.backends.get(name)
        if backend is None:
            raise RuntimeError(
                f"{fn.__qualname__!r} runs on the {name!r} backend, which {app.name!r} has not"
                " configured: set 'THREADCTX_CELERY' or 'THREADCTX_CELERY_APP'."
            )
        return backend.submit(app, app_ctx, fn, args, kwargs, options)

    def map(
        self,
        fn: t.Callable[..., R],
        *iterables: cabc.Iterable[t.Any],
        timeout: float | None = None,
    ) -> cabc.Iterator[R]:
        """Like :meth:`concurrent.futures.Executor.map`: submit ``fn`` for each set of items,
        each in its own contexts, and yield the results in order.

        All items are submitted before this returns. The iterables must have the same length.
        If a submit is refused (:exc:`QueueFull`), the tasks already submitted that have not
        started are cancelled and the error is raised. Closing the iterator early cancels the
        tasks that have not started.

        :param timeout: seconds from this call within which every result must be ready, or
            :exc:`concurrent.futures.TimeoutError` is raised.
        :raise ValueError: the iterables have different lengths.
        """
        return self._map(self.submit, fn, iterables, timeout)

    def _map(
        self,
        submit: t.Callable[..., TaskFuture[R]],
        fn: t.Callable[..., R],
        iterables: tuple[cabc.Iterable[t.Any], ...],
        timeout: float | None,
    ) -> cabc.Iterator[R]:
        """Internal API of :class:`~flask_threadctx.Task` too: :meth:`map` through ``submit``."""
        if not callable(fn):
            raise TypeError(f"'map' takes a callable to run, not {fn!r}.")
        if not iterables:
            raise TypeError("'map' needs at least one iterable of arguments.")
        try:
            calls = list(zip(*iterables, strict=True))
        except ValueError as exc:
            if not str(exc).startswith("zip() "):
                raise  # raised by one of the iterables themselves
            # zip says "zip() argument 2 is shorter than argument 1".
            detail = str(exc).replace("zip() ", "").replace("argument", "iterable")
            raise ValueError(f"'map' takes iterables of the same length: {detail}.") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        futures: list[TaskFuture[R]] = []
        try:
            for call in calls:
                futures.append(submit(fn, *call))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return _results(futures, deadline)

    @t.overload
    def task(self, fn: t.Callable[P, R], /) -> Task[P, R]: ...

    @t.overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        backend: str | None = None,
        keep_result: bool | None = None,
        **options: t.Any,
    ) -> t.Callable[[t.Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: t.Callable[P, R] | None = None,
        /,
        *,
        backend: str | None = None,
        keep_result: bool | None = None,
        **options: t.Any,
    ) -> Task[P, R] | t.Callable[[t.Callable[P, R]], Task[P, R]]:
        """Decorate a function so that it can be submitted as ``fn.submit(...)`` and
        ``fn.map(...)``; calling it directly still runs it in the caller.

        .. code-block:: python

            @threadctx.task
            def send_receipt(order_id: int) -> None: ...

            @threadctx.task(backend="celery", queue="heavy", max_retries=3, retry_for=(IOError,))
            def render_report(report_id: int) -> str: ...

            send_receipt.submit(42)

        :param backend: ``"threads"`` or ``"celery"``: where this function's tasks run,
            whatever ``THREADCTX_BACKEND`` says. ``None`` follows ``THREADCTX_BACKEND``.
        :param keep_result: with ``THREADCTX_TASK_STORE``, keep the result of each task of
            this function in the store, so that ``get_task(id).result()`` answers in every
            process: see :ref:`results-anywhere`. ``None`` follows
            ``THREADCTX_KEEP_RESULTS``. (A Celery task's result is always kept, by Celery.)
        :param options: when and how its tasks run, on either engine: ``countdown``,
            ``eta``, ``expires``, ``time_limit``, ``retry_for``, ``max_retries``,
            ``retry_delay``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``,
            ``rerunnable`` (keep what :meth:`rerun` needs; ``None`` follows
            ``THREADCTX_RERUNNABLE``); see :doc:`/control`. With ``backend="celery"``, also
            Celery's routing and ``soft_time_limit``: see :ref:`celery-task-options`.
        :raise ValueError: ``backend`` is not one of the two, or an option is out of its
            range (a number of seconds not within 0 to a year, a naive ``eta``, the soft
            time limit not below the hard one, an ``expires`` not after the start).
        :raise TypeError: an option is unknown, of the wrong type, or only for Celery
            without ``backend="celery"``; ``keep_result`` is not ``True``, ``False`` or
            ``None``.
        """
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f'\'backend\' must be "threads" or "celery", not {backend!r}.')
        if keep_result is not None and not isinstance(keep_result, bool):
            raise TypeError(f"'keep_result' must be True, False or None, not {keep_result!r}.")
        if options:
            from .options import check_options

            options = check_options(options, "celery" if backend == "celery" else "threads")

        def decorate(fn: t.Callable[P, R]) -> Task[P, R]:
            return Task(self, fn, backend, options, keep_result=keep_result)

        return decorate if fn is None else decorate(fn)

    def get_task(self, task_id: str) -> TaskFuture[t.Any] | None:
        """The future of a pending or running task of the current app, or of one of the
        ``THREADCTX_KEEP_FINISHED`` that finished most recently; ``None`` if there is none
        with this id. With Celery, any task of the app, from any process: see
        :ref:`celery-status`. With ``THREADCTX_TASK_STORE``, a task of another process comes
        as a snapshot from the store, without its result: see :doc:`/monitoring`.

        :raise TypeError: ``task_id`` is not a string.
        """
        if not isinstance(task_id, str):
            raise TypeError(f"'get_task' takes a task id string, not {task_id!r}.")
        state = app_state(self._current_app("get_task"), "get_task")
        default = state.default
        # The default first: a process that is a Celery worker too has the worker's side of
        # the same tasks in its thread pool.
        for backend in (default, *(b for b in state.backends.values() if b is not default)):
            future = backend.get(task_id)
            if future is not None:
                return future
        recorder = state.recorder
        if recorder is not None:
            record = recorder.store.get(task_id)
            if record is not None:
                return stored_future(record)
        return None

    def cancel_task(self, task_id: str) -> bool:
        """Stop the task ``task_id`` of the current app: if it has not started (or waits for
        its ``countdown`` or a retry), it never runs; if it is running, it is asked to stop,
        and stops at its next :func:`~flask_threadctx.check_cancelled` or
        :func:`~flask_threadctx.report_progress`: its state becomes ``"cancelled"`` and its
        future raises :exc:`~flask_threadctx.TaskCancelled`. See :doc:`/control`.

        A thread task of another process is stopped there, through ``THREADCTX_TASK_STORE``:
        this process asks, and waits for that process's answer up to
        ``THREADCTX_CANCEL_TIMEOUT``.

        :return: ``True`` if the task will not finish normally (a running task that catches
            the stop and returns still finishes), ``False`` if it had finished already.
        :raise TypeError: ``task_id`` is not a string.
        :raise LookupError: no task with this id is known to this process, nor to its task
            store.
        :raise TimeoutError: the task runs in another process, which did not answer within
            ``THREADCTX_CANCEL_TIMEOUT``: the message says what became of the request.
        :raise RuntimeError: the task runs in another process, which this process cannot
            reach (no store that carries stop requests).

        A store that cannot be reached raises its own error, as for ``get_task``.
        """
        if not isinstance(task_id, str):
            raise TypeError(f"'cancel_task' takes a task id string, not {shown(task_id)}.")
        app = self._current_app("cancel_task")
        state = app_state(app, "cancel_task")
        for backend in state.backends.values():
            stopped = backend.stop(task_id)
            if stopped is not None:
                return stopped
        recorder = state.recorder
        record = None if recorder is None else recorder.store.get(task_id)
        if record is not None:
            if record.state in FINISHED_STATES:
                return False
            engine = state.backends.get(record.backend)
            if record.backend != "threads" and engine is not None:
                # Submitted elsewhere just now: its record came after the engine looked.
                stopped = engine.stop(task_id)
                if stopped is not None:
                    return stopped
            return stop_in_its_process(app, record, state.settings.cancel_timeout)
        raise LookupError(
            f"No task {shown(task_id)} of {app.name!r} is known here: not among its pending,"
            " running or last finished tasks, nor in its task store."
        )

    def rerun(self, task_id: str) -> TaskFuture[object]:
        """Submit the task ``task_id`` of the current app again, as a new task: its function
        with the original arguments, options and request snapshot, on the original's engine.
        The new task's :attr:`TaskInfo.rerun_of <flask_threadctx.TaskInfo.rerun_of>` is
        ``task_id``. Only a task submitted with ``rerunnable=True`` (or
        ``THREADCTX_RERUNNABLE``) can be re-run: what it needs is read from the task store, so
        any process of the app can re-run it, in whatever state it is (a task still running
        runs on). See :doc:`/control`, "Re-run".

        :raise TypeError: ``task_id`` is not a string.
        :raise RuntimeError: the app has no ``THREADCTX_TASK_STORE``.
        :raise LookupError: the store has no task ``task_id``; or its function (or a class of
            its ``retry_for``) is no longer declared: removed or renamed. Nothing is submitted.
        :raise ValueError: the task was not submitted rerunnable.

        Whatever a submit raises (:exc:`~flask_threadctx.QueueFull`, ...) is raised too.
        """
        from .rerun import rerun

        return rerun(self, task_id)

    def stats(self, backend: str | None = None) -> dict[str, int]:
        """Counts of the current app's tasks: ``submitted``, ``queued``, ``running``,
        ``succeeded``, ``failed``, ``cancelled``, ``rejected``, and, for threads,
        ``max_workers``.

        ``submitted`` counts every task that was given a :class:`TaskInfo`, rejected ones
        included, so it is the sum of the six counts after it.

        With ``THREADCTX_TASK_STORE``, the counts are the store's: every task of the app, in
        every process, of both backends; ``max_workers`` is this process's.

        :param backend: whose tasks to count, ``"threads"`` (this process's pool) or
            ``"celery"`` (the app's tasks in every process); ``None`` for
            ``THREADCTX_BACKEND``'s, or the store's.
        """
        app = self._current_app("stats")
        state = app_state(app, "stats")
        if backend is None:
            default = state.default
            recorder = state.recorder
            if recorder is None:
                return default.stats()
            flush(app)  # this process's own tasks included
            counts = recorder.store.counts()
            if default.name == "threads":
                counts["max_workers"] = default.settings.max_workers
            return counts
        if backend not in state.backends:
            raise ValueError(f"{app.name!r} has no {backend!r} backend.")
        return state.backends[backend].stats()

    def monitor(
        self,
        check_access: t.Callable[[], bool] | None = None,
        *,
        check_action: t.Callable[[str, str], bool] | None = None,
        name: str = "threadctx_monitor",
    ) -> flask.Blueprint:
        """A blueprint with the task monitor: a live page of the app's tasks and its JSON API,
        and, with ``check_action``, the buttons Stop and Re-run. Register it under a prefix of
        your choice; see :doc:`/monitoring`.

        .. code-block:: python

            app.register_blueprint(
                threadctx.monitor(
                    check_access=lambda: current_user.is_admin,
                    check_action=lambda action, task_id: current_user.is_superuser,
                ),
                url_prefix="/admin/tasks",
            )

        :param check_access: called, with no arguments, for each request of the page and the
            API; a false answer gets ``403 Forbidden`` and no data (for the page, a short page
            that says to sign in). It may ``abort(redirect(...))`` to a login page instead.
            Required outside debug and testing mode: registering the blueprint without it
            raises :exc:`RuntimeError`. The metrics at ``/metrics`` also let in a scraper with
            ``THREADCTX_METRICS_TOKEN``.
        :param check_action: called as ``check_action(action, task_id)``, ``action`` being
            ``"stop"`` or ``"rerun"``, after ``check_access``: for each action (a ``POST``
            with the page's CSRF token), and for each look at a task's details, to show its
            button or not. A false answer gets ``403`` and nothing is done. ``None`` (the
            default): no actions, no buttons, and every action answers ``403``. Needs the
            app's ``SECRET_KEY``. See :ref:`monitor-actions`.
        :param name: the blueprint's name, for ``url_for("threadctx_monitor.page")``.
        :raise TypeError: ``check_access`` is not callable, or ``check_action`` cannot be
            called with two arguments.
        """
        from .monitor import make_monitor

        return make_monitor(check_access, check_action, name)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the current app's pool. Tasks already queued still run, unless
        ``cancel_futures``; submitting afterwards raises :exc:`RuntimeError`.

        :param wait: Return only when every task, and every child it submits, has finished,
            and the worker threads with them. Not from one of the pool's own tasks, which
            would wait for itself: that raises :exc:`RuntimeError`.
        :param cancel_futures: Cancel the tasks that have not started.
        """
        state = app_state(self._current_app("shutdown"), "shutdown")
        for backend in state.backends.values():
            backend.shutdown(wait, cancel_futures=cancel_futures)

    def _current_app(self, api: str) -> flask.Flask:
        app_ctx = active_app_context()
        if app_ctx is not None:
            return app_ctx.app
        if self._app is not None:
            return self._app
        raise RuntimeError(
            f"'{api}' needs an application context. Call it inside a request or"
            " 'with app.app_context():', or create the extension with 'ThreadContext(app)'."
        )


def _recorder(app: flask.Flask, state: AppState) -> Recorder:
    from .stores import open_store
    from .stores.feed import Recorder

    settings = state.settings
    url = settings.task_store
    assert url is not None
    store = state.backend("celery").records if url == "celery" else open_store(url, app, settings)
    return Recorder(
        app,
        store,
        skip="celery" if url == "celery" else None,
        keep_results=settings.keep_results,
        result_max_bytes=settings.result_max_bytes,
    )


def _results(futures: list[TaskFuture[R]], deadline: float | None) -> cabc.Iterator[R]:
    futures.reverse()
    try:
        while futures:
            future = futures.pop()
            if deadline is None:
                yield future.result()
            else:
                yield future.result(deadline - time.monotonic())
    finally:
        for future in futures:
            future.cancel()
