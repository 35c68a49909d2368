"""`DELETE /v1/episodes/{id}` and `POST /v1/erase`: erasure requests (admin key).

`POST /v1/erase {"metadata": {"user": "u-17"}}` erases every episode whose metadata (as given
to `POST /v1/episodes`) has all those keys with those values. The learner drops the episodes
from its buffer first, then the store deletes the episodes with their calls, feedback and
pass-through rows, and the LLM judge's episodes that quote them, and writes an `audit_log` row
(who, when, how many rows, never content) in the same transaction, then the learner is asked
again, for an episode pushed in between. If the learner cannot be reached at first nothing is
erased (a 503; the request may be repeated); if only the second time, the reply says so in
`learner_error`. A call of an erased episode still in flight on this proxy is not recorded
when it ends.
Adapters already trained on the data keep what they learned.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from flywheel.proxy.audit import audit_entry
from flywheel.proxy.errors import ApiError, read_json_object
from flywheel.proxy.state import STATE, ProxyState
from flywheel.store.records import Erase


async def erase_episode(request: web.Request) -> web.Response:
    episode_id = request.match_info["episode"]
    return await _erase(request, [episode_id], episode_id, {"episode_id": episode_id})


async def erase_matching(request: web.Request) -> web.Response:
    metadata = (await read_json_object(request)).get("metadata")
    if not isinstance(metadata, dict) or not metadata or not all(map(_is_text_or_number, metadata.values())):
        raise ApiError(400, "'metadata' must be a non-empty object of strings or numbers, e.g. "
                            '{"metadata": {"user": "u-17"}}', "invalid_field")
    state = request.app[STATE]
    wanted = {str(key): str(value) for key, value in metadata.items()}
    ids = await state.writer.read(state.writer.store.episodes_with_metadata, wanted)
    return await _erase(request, ids, None, {"metadata": wanted})


def _is_text_or_number(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


async def _erase(request: web.Request, episode_ids: list[str], target: str | None, detail: dict) -> web.Response:
    state = request.app[STATE]
    state.require_writable_store()
    learner = await _erase_at_learner(state, episode_ids)
    for episode_id in episode_ids:  # a call of it still in flight here is not recorded when it ends
        state.erased.add(episode_id)
    erased = await state.writer.submit(Erase(tuple(episode_ids), audit_entry(request, "erase", target,
                                                                              detail={**detail, "episodes": len(episode_ids)})))
    reply = {"episodes": erased.episodes, "calls": erased.calls, "feedback": erased.feedback,
             "passthrough": erased.passthrough, "judge_episodes": erased.judge_episodes, "learner_episodes": learner}
    try:
        reply["learner_episodes"] = max(learner, await _erase_at_learner(state, episode_ids))
    except ApiError as unreachable:  # the store's part is done: say what is left, for a repeat of the request
        reply["learner_error"] = unreachable.message
    return web.json_response(reply)


async def _erase_at_learner(state: ProxyState, episode_ids: list[str]) -> int:
    if state.feed is None or not episode_ids:
        return 0
    try:
        return await state.feed.erase(episode_ids)
    except grpc.aio.AioRpcError as failure:
        raise ApiError(503, f"the learner at {state.feed.target} cannot be reached to erase its copy "
                            f"({failure.details()}); nothing was erased, retry", "learner_unreachable") from None
