"""Who made a call, in which episode, for which task.

Three ways, any of which a client may use; the first that names a field wins:
1. the path prefix `/agents/{agent}[/episodes/{episode}]/v1/...` (a base_url alone is enough),
2. headers `X-Flywheel-Agent`, `X-Flywheel-Episode`, `X-Flywheel-Task`,
3. the body's `metadata` object with keys `agent`, `episode`, `task` (removed before forwarding).
A call without an episode gets a fresh one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

_KEYS = ("agent", "episode", "task")
HEADERS = {key: f"X-Flywheel-{key.capitalize()}" for key in _KEYS}


@dataclass(frozen=True)
class Attribution:
    agent: str
    episode_id: str
    task_id: str | None


def new_id(prefix: str) -> str:
    """128 random bits; `random` is seeded from the OS once, where uuid4 costs a syscall per id."""
    return f"{prefix}-{random.getrandbits(128):032x}"


def attribute(
    path_params: Mapping[str, str],
    headers: Mapping[str, str],
    body: dict,
    default_agent: str,
) -> Attribution:
    """Resolve attribution; pops Flywheel's keys from `body["metadata"]` (drops it if emptied)."""
    meta = body.get("metadata")
    from_body: dict = {}
    if isinstance(meta, dict):
        from_body = {key: meta.pop(key) for key in _KEYS if key in meta}
        if not meta:
            del body["metadata"]

    def pick(key: str) -> str | None:
        for source in (path_params.get(key), headers.get(HEADERS[key]), from_body.get(key)):
            if source not in (None, ""):
                return str(source)
        return None

    return Attribution(
        agent=pick("agent") or default_agent,
        episode_id=pick("episode") or new_id("ep"),
        task_id=pick("task"),
    )
