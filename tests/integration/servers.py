"""Start a real WSGI server in its own process, find its port, stop it with SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
KINDS = ["gunicorn-gthread", "gunicorn-gevent", "waitress", "werkzeug"]
_LISTENING = re.compile(r"(?:LISTENING |Listening at: http://127\.0\.0\.1:)(\d+)")


@dataclasses.dataclass
class Server:
    kind: str
    process: subprocess.Popen[str]
    port: int
    output: list[str]
    reader: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 90) -> tuple[int, float]:
        """SIGTERM the server; return its exit code and how long it took to exit. A server
        still running ``timeout`` seconds later is killed and the test fails with its log."""
        start = time.monotonic()
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.kind} was still running {timeout}s after SIGTERM:\n{self.log}"
            ) from None
        finally:
            self.reader.join(10)
            if self.process.stdout is not None:
                self.process.stdout.close()
        return code, time.monotonic() - start

    @property
    def log(self) -> str:
        return "".join(self.output)


WSGI_APP = "wsgi_app:create_app()"


def command(kind: str, workers: int = 2, app: str = WSGI_APP) -> list[str]:
    python = sys.executable
    if kind == "gunicorn-gthread":
        return [python, "-m", "gunicorn", "-k", "gthread", "-w", str(workers), "--threads", "8",
                "--preload", *_gunicorn_common(app)]  # fmt: skip
    if kind == "gunicorn-gevent":
        return [python, "-m", "gunicorn", "-k", "gevent", "-w", str(workers),
                *_gunicorn_common(app)]  # fmt: skip
    return [python, str(HERE / "serve.py"), kind, app]


def _gunicorn_common(app: str) -> list[str]:
    return ["-b", "127.0.0.1:0", "--graceful-timeout", "60", "--chdir", str(HERE),
            "-c", str(HERE / "gunicorn_conf.py"), "--log-level", "info", app]  # fmt: skip


def start(
    kind: str,
    db: Path,
    workers: int = 2,
    app: str = WSGI_APP,
    environment: dict[str, str] | None = None,
    **env: str,
) -> Server:
    """Start a server of ``kind`` for ``app`` (``wsgi_app``'s by default) and wait until it
    listens (and, for gunicorn, until every worker has booted).

    A server that exits while it starts is started once more, its log printed (shown with a
    failure): a gunicorn with gevent workers once exited so on a cold CI machine, its log not
    kept, and the test met a closed port.

    :param workers: processes, for gunicorn.
    :param environment: and ``env``: more environment variables for the server.
    """
    try:
        return _start(kind, db, workers, app, environment, **env)
    except _ExitedAtStart as first:
        print(f"{kind} exited as it started; starting it again. Its log:\n{first}")
        try:
            return _start(kind, db, workers, app, environment, **env)
        except _ExitedAtStart as second:
            raise RuntimeError(f"{kind} exited as it started, twice:\n{first}\n{second}") from None


class _ExitedAtStart(RuntimeError):
    """The server process ended before it was ready; the message is its log."""


def _start(
    kind: str,
    db: Path,
    workers: int,
    app: str,
    environment: dict[str, str] | None,
    **env: str,
) -> Server:
    environ = {
        **os.environ,
        "THREADCTX_TEST_DB": str(db),
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
        **(environment or {}),
        **env,
    }
    process = subprocess.Popen(
        command(kind, workers, app),
        cwd=HERE,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    port: list[int] = []
    ready = [0]
    expected_ready = workers if kind.startswith("gunicorn") else 0
    listening = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = _LISTENING.search(line)
            if match and not port:
                port.append(int(match.group(1)))
            ready[0] += line.startswith("WORKER READY")
            if port and ready[0] >= expected_ready:
                listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    server = Server(kind, process, 0, output, reader)
    if not listening.wait(60) or not port:
        process.kill()
        server.stop()
        raise RuntimeError(f"{kind} did not start:\n{server.log}")
    if ready[0] < expected_ready or process.poll() is not None:  # its output ended: it exited
        server.stop()
        raise _ExitedAtStart(server.log)
    server.port = port[0]
    return server


def require_servers() -> None:
    """Fail, saying what to install, when a server package is missing: the integration suite
    never skips a server silently."""
    missing = []
    for module in ("gunicorn", "gevent", "waitress"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(
            f"The integration suite needs {', '.join(missing)}: install them with"
            " 'pip install -r requirements/tests.txt'."
        )


def get_json(url: str) -> tuple[int, t.Any]:
    """The status and JSON body of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
