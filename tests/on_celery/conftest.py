# The fixtures live in harness.py, which mypy checks; a second conftest.py it would refuse.
from harness import app  # noqa: F401
from harness import app_ctx  # noqa: F401
from harness import redis_server  # noqa: F401
from harness import redis_url  # noqa: F401
from harness import web  # noqa: F401
from harness import worker_env  # noqa: F401
from harness import workers  # noqa: F401
