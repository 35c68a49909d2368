"""The upstream vLLM replicas: which one serves a call, and which are fit to.

Every call of an episode goes to the same replica, so its growing prompt hits that replica's
prefix cache: the replica is chosen by rendezvous (highest random weight) hashing of the
episode id over the live replicas. Adding or losing one of N replicas moves only the ~1/N
of episodes that now score highest on it (or scored highest on the lost one); the others stay.

A replica is `live` once it answered the registry's last look at its model list *and* holds
every adapter version that may be routed (`Registry.sync`): one that (re)joins is given the
versions first, so no call reaches a replica without its adapter. A call that cannot connect
(nothing was sent) marks its replica down and goes to the episode's next replica; a call
that broke after it was sent fails with a 502 (it may have been processed). With no replica
live, calls still try them all in the episode's order rather than fail unasked.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Sequence

from flywheel.proxy.admin import UpstreamAdmin, upstream_base
from flywheel.proxy.upstream import UpstreamPool, UpstreamResponse, UpstreamUnreachable

log = logging.getLogger("flywheel.replicas")


def rendezvous_order(key: str, names: Sequence[str]) -> list[int]:
    """Indices of `names`, best first, by the score blake2b(name ‖ 0 ‖ key) of each (highest
    random weight hashing): the first is the key's home, the next its fallback, and so on.
    Removing a name changes the order of no other two."""
    def score(index: int) -> bytes:
        return hashlib.blake2b(f"{names[index]}\0{key}".encode(), digest_size=8).digest()

    return sorted(range(len(names)), key=score, reverse=True)


@dataclass(eq=False)  # replicas are compared by identity
class Replica:
    url: str  # as configured
    pool: UpstreamPool  # the LLM calls
    admin: UpstreamAdmin  # adapter loading, model list, pass-through routes
    up: bool = False  # answered the last look at its model list
    live: bool = False  # up and holding every routable adapter version: takes new episodes
    detail: str = "not checked yet"
    held: set[str] = field(default_factory=set)  # adapter names loaded into it (a missing one was lost: restart)

    async def models(self) -> dict[str, str | None]:
        """The ids vLLM lists, each with the directory it was loaded from (its card's `root`);
        a 502 ApiError when it cannot be reached or does not answer 200."""
        status, body, _ = await self.admin.get("models")
        if status != 200:
            raise self.admin.unreachable(f"GET /v1/models answered {status}")
        return {card.get("id"): card.get("root") for card in json.loads(body).get("data", [])}


class Replicas:
    def __init__(self, urls: Sequence[str], timeout_s: float, api_key: str, max_connections: int):
        if not urls:
            raise ValueError("at least one upstream is needed")
        self.replicas = [Replica(url, UpstreamPool(upstream_base(url), max_connections=max_connections),
                                 UpstreamAdmin(url, timeout_s, api_key)) for url in urls]
        self._names = [replica.url for replica in self.replicas]

    def order(self, key: str) -> list[Replica]:
        """The replicas to try for `key`, best first: live ones in rendezvous order, then the rest."""
        ranked = [self.replicas[i] for i in rendezvous_order(key, self._names)]
        return [r for r in ranked if r.live] + [r for r in ranked if not r.live]

    def live(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.live]

    async def post(self, key: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST on the key's replica; one that cannot be connected to is marked down and the next tried."""
        failure: UpstreamUnreachable | None = None
        for replica in self.order(key):
            try:
                return await replica.pool.post(path, body, headers)
            except UpstreamUnreachable as refused:
                self.mark_down(replica, str(refused))
                failure = refused
        raise failure

    def mark_down(self, replica: Replica, detail: str) -> None:
        if replica.live:
            log.warning("upstream %s is down (%s): its episodes go to the next replica", replica.url, detail)
        replica.up = replica.live = False
        replica.detail = detail

    def mark_live(self, replica: Replica) -> None:
        if not replica.live and len(self.replicas) > 1:
            log.info("upstream %s is live: it takes its episodes again", replica.url)
        replica.up = replica.live = True
        replica.detail = "live"

    def admin(self) -> UpstreamAdmin:
        """For calls any replica can answer (model list, tokenize, embeddings): a live one if any."""
        return (self.live() or self.replicas)[0].admin

    @staticmethod
    def abort(response: UpstreamResponse) -> None:
        """Drop a response not read to its end: its connection cannot be reused."""
        response.pool.abort(response)

    @property
    def in_progress(self) -> int:
        return sum(replica.pool.in_progress for replica in self.replicas)

    def health(self) -> dict[str, dict]:
        return {replica.url: {"live": replica.live, "detail": replica.detail} for replica in self.replicas}

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.pool.close()
            await replica.admin.close()
