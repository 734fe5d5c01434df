"""A bounded load generator, run as its own process: ``python loadgen.py URL CLIENTS REQUESTS``.

Each request carries its own user id in the query string, the JSON body, a header and a signed
session cookie. Prints a JSON summary: how many were sent, the status codes, any errors.
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import sys
import threading
import time
import typing as t
import urllib.parse

from flask import Flask
from flask.sessions import SecureCookieSessionInterface

from wsgi_app import SECRET_KEY

DEADLINE_SECONDS = 180


def main(url: str, clients: int, requests: int, path: str = "/work") -> dict[str, object]:
    signer = Flask("loadgen")
    signer.secret_key = SECRET_KEY
    interface = t.cast(SecureCookieSessionInterface, signer.session_interface)
    serializer = interface.get_signing_serializer(signer)
    assert serializer is not None
    split = urllib.parse.urlsplit(url)
    host, port = str(split.hostname), split.port
    numbers = itertools.count()
    statuses: collections.Counter[int] = collections.Counter()
    errors: list[str] = []
    retry_after = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_SECONDS

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while time.monotonic() < deadline:
            n = next(numbers)
            if n >= requests:
                break
            user = f"u{n}"
            body = json.dumps({"user": user})
            headers = {
                "Content-Type": "application/json",
                "X-User": user,
                "X-Request-Id": user,
                "Cookie": f"session={serializer.dumps({'user': user})}",
            }
            try:
                conn.request("POST", f"{path}?user={user}", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] += 1
                    if response.status == 503 and response.getheader("Retry-After") == "1":
                        retry_after[0] += 1
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{user}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "sent": sum(statuses.values()) + len(errors),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "errors": errors[:20],
        "error_count": len(errors),
        "503_with_retry_after": retry_after[0],
        "seconds": time.monotonic() - start,
    }


if __name__ == "__main__":
    url, clients, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/work"
    print(json.dumps(main(url, clients, requests, path)))
