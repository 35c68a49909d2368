"""Who made a call, in which episode, for which task.

Three ways, any of which a client may use; the first that names a field wins:
1. the path prefix `/agents/{agent}[/episodes/{episode}]/v1/...` (a base_url alone is enough),
2. headers `X-Flywheel-Agent`, `X-Flywheel-Episode`, `X-Flywheel-Task`,
3. the body's `metadata` object with keys `agent`, `episode`, `task` (removed before forwarding).
A call without an episode gets a fresh one. Names are printable ASCII of at most 256
characters (a 400 otherwise): they come back in response headers and name adapters.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Mapping

from flywheel.proxy.errors import ApiError

_KEYS = ("agent", "episode", "task")
HEADERS = {key: f"X-Flywheel-{key.capitalize()}" for key in _KEYS}
_NAME = re.compile(r"[\x20-\x7e]{1,256}")


@dataclass(frozen=True)
class Attribution:
    agent: str
    episode_id: str | None  # None only when asked not to open a fresh episode (pass-through calls)
    task_id: str | None


def new_id(prefix: str) -> str:
    """128 bits from the OS's CSPRNG: ids are unguessable, so knowing one episode's id says
    nothing about another's."""
    return f"{prefix}-{secrets.token_hex(16)}"


def attribute(
    path_params: Mapping[str, str],
    headers: Mapping[str, str],
    body: dict,
    default_agent: str,
    fresh_episode: bool = True,
) -> Attribution:
    """Resolve attribution; pops Flywheel's keys from `body["metadata"]` (drops it if emptied).
    A call that names no episode gets a fresh one, unless `fresh_episode` is false."""
    meta = body.get("metadata")
    from_body: dict = {}
    if isinstance(meta, dict):
        from_body = {key: meta.pop(key) for key in _KEYS if key in meta}
        if not meta:
            del body["metadata"]

    def pick(key: str) -> str | None:
        for source in (path_params.get(key), headers.get(HEADERS[key]), from_body.get(key)):
            if source not in (None, ""):
                return checked_name(key, str(source))
        return None

    return Attribution(
        agent=pick("agent") or default_agent,
        episode_id=pick("episode") or (new_id("ep") if fresh_episode else None),
        task_id=pick("task"),
    )


def checked_name(key: str, value: str) -> str:
    """`value` if it is a valid agent, episode or task name; a 400 ApiError otherwise."""
    if not _NAME.fullmatch(value):
        raise ApiError(400, f"{key} {value[:80]!r} must be 1 to 256 printable ASCII characters", "invalid_name")
    return value
