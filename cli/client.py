"""The command line's HTTP client to a running proxy, with typed errors."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import IO

DEFAULT_URL = "http://127.0.0.1:8400"
KEY_VARIABLE = "FLYWHEEL_API_KEY"  # the key the command line sends (an admin key for sql, status, train)


class ProxyError(RuntimeError):
    """The proxy answered with an error; the message is the proxy's own."""


class ProxyUnreachable(ProxyError):
    """No proxy answered at the URL."""


def _request(url: str, path: str, body: dict | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if os.environ.get(KEY_VARIABLE):
        headers["Authorization"] = f"Bearer {os.environ[KEY_VARIABLE]}"
    return urllib.request.Request(url.rstrip("/") + path, headers=headers,
                                  data=json.dumps(body).encode() if body is not None else None)


def readiness(url: str) -> dict:
    """GET /readyz, whether ready (200) or not (503): {"ready", "checks"}."""
    try:
        with urllib.request.urlopen(_request(url, "/readyz", None), timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as not_ready:
        return json.load(not_ready)
    except urllib.error.URLError as down:
        raise ProxyUnreachable(f"no proxy at {url} ({down.reason})") from None


def proxy_request(url: str, path: str, body: dict | None = None, timeout_s: float = 120, hint: str = "") -> IO[bytes]:
    """An open response from the proxy (POST with `body`, else GET); raises ProxyError with the
    proxy's message for an error reply, ProxyUnreachable when nothing answers."""
    request = _request(url, path, body)
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as refused:
        try:
            message = json.load(refused).get("error", {}).get("message", refused.reason)
        except ValueError:
            message = refused.reason
        raise ProxyError(f"{path}: {message}") from None
    except urllib.error.URLError as down:
        raise ProxyUnreachable(f"no proxy at {url} ({down.reason}){hint}") from None


def fetch_via_proxy(query: str, url: str) -> dict:
    """One read-only query through the proxy's /v1/sql: {columns, types, rows, truncated}."""
    with proxy_request(url, "/v1/sql", {"query": query}, hint="; pass --db FILE for a file") as response:
        return json.load(response)
