from flask_threadctx import ThreadContext

threadctx = ThreadContext()
"""The app's task pool, registered on each app by ``create_app``."""
