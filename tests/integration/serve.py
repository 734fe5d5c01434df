"""Serve ``wsgi_app`` (or the app the second argument names, as gunicorn names one) with
Werkzeug's threaded server or waitress on 127.0.0.1, on a port the system picks, printed as
``LISTENING <port>``. SIGTERM exits through ``sys.exit``, so that exit
hooks (the task pool's drain) run, as they do under gunicorn."""

from __future__ import annotations

import importlib
import signal
import sys
import typing as t

from waitress import create_server
from werkzeug.serving import make_server


def main(kind: str, app_path: str = "wsgi_app:create_app()") -> None:
    # As gunicorn names an app: 'module:factory()'.
    module, _, factory = app_path.partition(":")
    app = getattr(importlib.import_module(module), factory.removesuffix("()"))()
    server: t.Any
    if kind == "werkzeug":
        server = make_server("127.0.0.1", 0, app, threaded=True)
        port, run = server.port, server.serve_forever
    elif kind == "waitress":
        server = create_server(app, host="127.0.0.1", port=0, threads=8)
        port, run = server.effective_port, server.run
    else:
        raise SystemExit(f"unknown server {kind!r}")

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"LISTENING {port}", flush=True)
    run()


if __name__ == "__main__":
    main(*sys.argv[1:])
