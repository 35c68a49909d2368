"""The sampling parameters a call is generated with: checked, made explicit, recorded.

The learner's importance weights compare its own log-probs with vLLM's, so it must know
the exact distribution each token was drawn from. Every sampling field a client may send
is type- and range-checked (a 400 in OpenAI's shape otherwise, before anything reaches
the upstream or the store). A field the client left out takes the proxy's
`sampling_defaults` (the model's generation config, which `flywheel up` reads and passes
on, starting vLLM with `--generation-config vllm` so it injects nothing hidden), written
into the forwarded body, else vLLM's neutral value. What is recorded is what was sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from flywheel.proxy.errors import ApiError

# vLLM's value when a field is absent and no generation config applies: no effect on sampling.
NEUTRAL: dict[str, float] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
}

# field -> (lowest, highest, whether the lowest is allowed)
_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, math.inf, True), "top_p": (0.0, 1.0, False), "min_p": (0.0, 1.0, True),
    "presence_penalty": (-2.0, 2.0, True), "frequency_penalty": (-2.0, 2.0, True),
    "repetition_penalty": (0.0, math.inf, False),
}
_INTEGERS = {"n": 1, "max_tokens": 1, "max_completion_tokens": 1, "top_k": -1}  # field -> smallest allowed
_LARGEST = 2**31 - 1  # the store's INTEGER columns; no model samples more tokens or choices than this


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    choices: int  # n


def checked_defaults(defaults: Mapping[str, float]) -> dict[str, float | int]:
    """`sampling_defaults` with valid values of the fields above only (top_k as an integer);
    raises ValueError."""
    unknown = sorted(set(defaults) - set(NEUTRAL))
    if unknown:
        raise ValueError(f"sampling_defaults: unknown field(s) {', '.join(unknown)}; known: {', '.join(NEUTRAL)}")
    whole = {name: int(v) if name in _INTEGERS and float(v).is_integer() else v for name, v in defaults.items()}
    try:
        return {name: _checked(name, value) for name, value in whole.items()}
    except ApiError as bad:
        raise ValueError(f"sampling_defaults: {bad.message}") from None


def resolve(body: dict[str, Any], defaults: Mapping[str, float]) -> Sampling:
    """Check the body's sampling fields, write the defaults it lacks into it, return what samples."""
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise ApiError(400, f"'stream' must be true or false, got {body['stream']!r}", "invalid_field")
    for name in _INTEGERS.keys() - NEUTRAL.keys():
        if body.get(name) is not None:
            _checked(name, body[name])
    values = {}
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is None and name in defaults:
            value = body[name] = defaults[name]
        values[name] = neutral if value is None else _checked(name, value)
    return Sampling(**values, choices=int(body.get("n") or 1))


def _checked(name: str, value: Any) -> float | int:
    if name in _INTEGERS:
        if isinstance(value, bool) or not isinstance(value, int) or not _INTEGERS[name] <= value <= _LARGEST:
            raise ApiError(400, f"'{name}' must be an integer in [{_INTEGERS[name]}, {_LARGEST}], got {value!r}",
                           "invalid_field")
        return value
    low, high, low_allowed = _RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", "invalid_field")
    if value > high or value < low or (value == low and not low_allowed):
        bounds = f"{'[' if low_allowed else '('}{low:g}, {high:g}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value!r}", "invalid_field")
    return float(value)
