"""Who may call which route, and the guards a web page cannot get past.

Keys: `api_keys` reach what an agent needs (inference, /v1/models, its own episodes);
`admin_keys` reach everything, including what reads or changes all agents: /v1/sql (every
prompt and answer), /v1/adapters*, /v1/learner/*, /metrics. A key comes as
`Authorization: Bearer KEY` (what the OpenAI SDK sends) or `X-Api-Key: KEY`. With no key
configured every route is open, so the proxy then binds loopback only (`check_bind`).

Whatever the keys, two guards stop a page in the user's browser from driving the proxy:
every POST must say `Content-Type: application/json` (a page can send text/plain or a form
to any origin without asking; JSON needs a CORS preflight, which is never granted), and on
a loopback bind the Host header must name loopback (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.policy import KeyRule
from flywheel.proxy.errors import ApiError

MIN_KEY_CHARS = 16
_LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1"}


class Access(enum.Enum):
    PUBLIC = "public"  # liveness and the API description: no key
    CLIENT = "client"  # an api key or an admin key
    ADMIN = "admin"  # an admin key


ROUTE_ACCESS = web.AppKey("flywheel_route_access", dict)  # aiohttp route -> Access


class InsecureConfig(ValueError):
    """Keys or a bind address that would expose the store: refused at start."""


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ProxyConfig) -> None:
    """Refuse keys too short to resist guessing, and an open proxy on a non-loopback address."""
    short = [k for k in (*config.client_keys, *config.every_admin_key) if len(k) < MIN_KEY_CHARS]
    if short:
        raise InsecureConfig(f"keys must be at least {MIN_KEY_CHARS} characters ({len(short)} shorter); "
                             "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not (config.client_keys or config.every_admin_key) and not is_loopback(config.host) and not config.insecure:
        raise InsecureConfig(f"refusing to serve {config.host} without keys: anyone reaching the port could read "
                             "every prompt through /v1/sql; set [proxy] api_keys and admin_keys "
                             "(FLYWHEEL_PROXY_API_KEYS, FLYWHEEL_PROXY_ADMIN_KEYS), or pass --insecure")


@dataclass(frozen=True)
class Grant:
    """What a presented key reaches, and which key it was."""

    access: Access
    key_id: str  # the first 12 hex digits of the key's SHA-256: names it in logs and the audit, reveals nothing
    rule: KeyRule | None  # its [[proxy.keys]] table, if it has one


GRANT = web.RequestKey("flywheel_grant", Grant)  # set on a request whose key was checked


class Keys:
    """The configured keys, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, config: ProxyConfig):
        rules = {rule.key: rule for rule in config.keys}
        self._known = [(_digest(k), Access.CLIENT, rules.get(k)) for k in config.client_keys]
        self._known += [(_digest(k), Access.ADMIN, rules.get(k)) for k in config.every_admin_key]

    @property
    def enabled(self) -> bool:
        return bool(self._known)

    def grant(self, key: str | None) -> Grant | None:
        """The most the key reaches, or None for no key or a wrong one."""
        if key is None:
            return None
        digest, found = _digest(key), None
        for candidate, access, rule in self._known:  # no early exit: the time taken does not say which key matched
            if hmac.compare_digest(digest, candidate) and (found is None or access is Access.ADMIN):
                found = Grant(access, digest.hex()[:12], rule)
        return found


def presented_key(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-Api-Key") or None


def guard_middleware(config: ProxyConfig, current_keys: Callable[[], Keys]):
    """Requests in flight capped, Host on a loopback bind, keys per route (ROUTE_ACCESS; the
    keys `current_keys` gives, which a reload replaces), JSON-only POSTs, and the body read
    within `body_timeout_s`."""
    check_host = is_loopback(config.host)
    in_flight = 0

    @web.middleware
    async def guard(request: web.Request, handler):
        nonlocal in_flight
        public = request.app[ROUTE_ACCESS].get(request.match_info.route) is Access.PUBLIC
        if in_flight >= config.max_in_flight and not public:  # probes always answer: a busy proxy is alive
            raise ApiError(503, f"the proxy is handling {in_flight} requests, its max_in_flight; retry shortly",
                           "overloaded", headers={"Retry-After": "1"})
        in_flight += 1
        try:
            if check_host and not is_loopback(_hostname(request.host)):
                raise ApiError(403, f"Host {request.host!r} is not this loopback proxy's; use 127.0.0.1 or "
                                    "localhost", "host_not_allowed")
            keys = current_keys()
            if keys.enabled:
                _authorize(request, keys)
            if request.method == "POST":
                if request.content_type != "application/json":
                    raise ApiError(415, f"POST bodies must be JSON: send Content-Type: application/json, "
                                        f"not {request.content_type!r}", "unsupported_media_type")
                try:  # read here, under a deadline; handlers get the cached body
                    async with asyncio.timeout(config.body_timeout_s):
                        await request.read()
                except TimeoutError:
                    raise ApiError(408, f"request body not received within {config.body_timeout_s:g} s",
                                   "body_timeout") from None
            return await handler(request)
        finally:
            in_flight -= 1

    return guard


def _authorize(request: web.Request, keys: Keys) -> None:
    route = request.match_info.route
    # an unknown route needs some key, so that its 404 tells a stranger nothing
    needed = request.app[ROUTE_ACCESS].get(route, Access.CLIENT)
    if needed is Access.PUBLIC:
        return
    granted = keys.grant(presented_key(request))
    if granted is None:
        missing = presented_key(request) is None
        raise ApiError(401, "missing API key: send Authorization: Bearer KEY" if missing else "invalid API key",
                       "missing_api_key" if missing else "invalid_api_key")
    request[GRANT] = granted
    if needed is Access.ADMIN and granted.access is not Access.ADMIN:
        raise ApiError(403, f"{request.method} {request.path} needs an admin key", "admin_key_required")


def _hostname(host: str | None) -> str:
    """The name in a Host header, without its port ("[::1]:8400" -> "::1")."""
    host = host or ""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()

