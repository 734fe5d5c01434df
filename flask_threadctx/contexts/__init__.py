"""Flask's contexts, carried to where a task runs.

- :mod:`.capture`: capturing the contexts in the submitting thread and re-creating them around a
  task in this process; the only module that touches Flask's private names;
- :mod:`.request_snapshot`: the request as every task of one request sees it, and each task's
  copy of it;
- :mod:`.plain_data`: what of ``g`` and the session is plain data, which may be copied or sent;
- :mod:`.wire`: what crosses a process boundary with a task, and how it is rebuilt there;
- :mod:`.threads`: :class:`~flask_threadctx.ContextThread` and
  :func:`~flask_threadctx.copy_current_context`, for threads a user starts.
"""
