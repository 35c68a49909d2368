"""Errors in OpenAI's shape: {"error": {"message", "type", "code"}}, for every route."""

from __future__ import annotations

import json
import logging

import orjson
from aiohttp import web

log = logging.getLogger("flywheel.proxy")

MAX_ERROR_CHARS = 4000  # upstream error bodies are recorded up to this length

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class ApiError(Exception):
    """Raised by handlers; rendered by `error_middleware`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def error_response(status: int, message: str, code: str | None = None, headers=None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(status, message, code)),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err.status, err.message, err.code, headers=err.headers)
    except web.HTTPRequestEntityTooLarge as err:
        return error_response(413, f"request body too large: {err.text}", "body_too_large")
    except web.HTTPNotFound:
        return error_response(404, f"unknown route: {request.method} {request.path}", "unknown_route")
    except web.HTTPMethodNotAllowed as err:
        return error_response(
            405, f"method {request.method} not allowed on {request.path}; use {', '.join(sorted(err.allowed_methods))}",
            "method_not_allowed",
        )
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return error_response(err.status, err.reason, None)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error in the Flywheel proxy; see its log", "internal_error")


async def read_json_object(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400/413 ApiError."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as bad:
        try:  # the stdlib parser names NaN and Infinity, which Python's json.dumps writes
            json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than orjson's limit (1024)
            pass
        raise ApiError(400, f"request body is not valid JSON: {bad}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    return body


def _refuse_constant(name: str):
    raise ApiError(400, f"request body is not valid JSON: {name} is not a JSON number; send a finite number",
                   "invalid_json")
