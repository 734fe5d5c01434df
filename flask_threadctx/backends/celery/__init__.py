"""The Celery engine: tasks sent to Celery workers through a Redis broker, with their contexts
rebuilt there. Imported only by an app that configures Celery (``THREADCTX_CELERY`` or
``THREADCTX_CELERY_APP``); it imports Celery and redis-py.

- :mod:`.backend`: :class:`~.backend.CeleryBackend`, the submitting side, put together from
  :mod:`.state`, :mod:`.sending`, :mod:`.listener` and :mod:`.worker`;
- :mod:`.messages`: the task name, the options, the JSON of a message;
- :mod:`.worker`: the generic Celery task, the worker side and Celery's signal hooks, connected
  when a backend registers its task on a Celery app, and ``flask threadctx worker``.
"""
