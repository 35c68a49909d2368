"""What the data policies and limits decide for one request, for every route that forwards to
the model (LLM calls, and the pass-through embeddings and tokenizer routes)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from flywheel.proxy.attribution import Attribution
from flywheel.proxy.audit import caller_key_id
from flywheel.proxy.auth import GRANT
from flywheel.proxy.policy import CallPolicy, Rule, covering, narrowest, requested
from flywheel.proxy.quotas import OverLimit, Ticket, limited
from flywheel.proxy.state import ProxyState


@dataclass(frozen=True)
class Governed:
    policy: CallPolicy  # what the store keeps, and whether it may be trained on
    rules: tuple[Rule, ...]  # the key's and agents' rules that cover it (their limits)
    key_id: str | None  # the caller's key, if keys are configured


def govern(request: web.Request, state: ProxyState, who: Attribution) -> Governed:
    """The narrowest of the key's rule, the agent rules, the request's headers and what an
    earlier call of the episode allowed (a 400 for a bad policy header)."""
    grant = request.get(GRANT)
    rules = covering(grant.rule if grant else None, state.rules.config.agents, who.agent)
    policy = narrowest([*rules, requested(request.headers),
                        *([CallPolicy("full", False)] if who.episode_id in state.untrainable else [])])
    return Governed(policy, tuple(rules), caller_key_id(request))


def admit(state: ProxyState, governed: Governed, who: Attribution) -> Ticket:
    """Count the call against its limits (none for a held-out evaluation episode), or refuse it
    with a 429 (counted in the metrics). Release the ticket when the call ends."""
    held_out = who.episode_id in state.quotas.exempt
    try:
        return state.quotas.admit([] if held_out else limited(governed.rules, governed.key_id, who.agent))
    except OverLimit as over:
        state.metrics.over_limit.labels(who.agent, over.limit).inc()
        raise
