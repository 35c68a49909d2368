"""Redaction: personal data replaced by typed placeholders before the model sees a request.

Configured detectors (`[proxy] redact`) run over the text a request sends the model: chat
messages' content (strings and text parts) and tool-call arguments, a completion's prompt, a
Responses call's input and instructions, the texts to embed and to tokenize. Each distinct value found becomes a numbered
placeholder of its kind, the same one wherever it recurs in the call:

    email     name@example.com                       <EMAIL_1>
    card      13-19 digits (spaces or dashes) passing the Luhn check     <CARD_1>
    ipv4      four dotted octets, each 0-255           <IPV4_1>
    phone     9-15 digits with the usual separators    <PHONE_1>
    regex:P   whatever the regular expression P matches   <REDACTED_1>

Detectors run in that order (a card's digits are not then taken for a phone number). The
forwarded body is the redacted one, and it is what the store keeps and the learner trains on,
so stored token ids are exactly what the model saw; the originals are never stored. With
`redact_restore` the client's response has each placeholder the model repeated put back
(JSON-escaped, in the response bytes; in a stream, within each event).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import orjson


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a card number: every second digit from the right doubled (minus 9 if over 9),
    the sum a multiple of 10."""
    total = 0
    for position, digit in enumerate(int(d) for d in reversed(digits)):
        total += digit if position % 2 == 0 else (digit * 2 - 9 if digit > 4 else digit * 2)
    return total % 10 == 0


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


@dataclass(frozen=True)
class Detector:
    name: str  # as configured: email, card, ipv4, phone or regex:...
    kind: str  # the placeholder's: EMAIL, CARD, ...
    pattern: re.Pattern
    valid: Callable[[str], bool] = lambda match: True


_BUILT_IN = {
    "email": Detector("email", "EMAIL", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    "card": Detector("card", "CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
                     lambda match: luhn_valid(_digits(match))),
    "ipv4": Detector("ipv4", "IPV4", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                                                r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")),
    "phone": Detector("phone", "PHONE", re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d(?!\w)"),
                      lambda match: 9 <= len(_digits(match)) <= 15),
}
ORDER = ("email", "card", "ipv4", "phone")


class UnknownDetector(ValueError):
    """A `redact` entry that names no detector, or a regex that does not compile."""


def detectors(names: tuple[str, ...]) -> list[Detector]:
    """The configured detectors, built-in ones in their fixed order, then the regexes as given."""
    regexes = []
    for name in names:
        if name.startswith("regex:"):
            try:
                regexes.append(Detector(name, "REDACTED", re.compile(name[len("regex:"):])))
            except re.error as bad:
                raise UnknownDetector(f"redact {name!r}: not a regular expression ({bad})") from None
        elif name not in _BUILT_IN:
            raise UnknownDetector(f"redact {name!r}: detectors are {', '.join(ORDER)} and regex:PATTERN")
    return [_BUILT_IN[name] for name in ORDER if name in names] + regexes


class Redaction:
    """One call's redaction: the placeholders it made, and how many matches per detector."""

    def __init__(self, found_by: list[Detector]):
        self.detectors = found_by
        self.counts: Counter[str] = Counter()
        self.originals: dict[str, str] = {}  # placeholder -> the value it stands for (never stored)
        self._placeholders: dict[tuple[str, str], str] = {}

    def text(self, text: str) -> str:
        for detector in self.detectors:
            text = detector.pattern.sub(lambda m, d=detector: self._replace(d, m.group(0)), text)
        return text

    def _replace(self, detector: Detector, value: str) -> str:
        if not detector.valid(value):
            return value
        self.counts[detector.name] += 1
        key = (detector.kind, value)
        if key not in self._placeholders:
            number = sum(1 for kind, _ in self._placeholders if kind == detector.kind) + 1
            self._placeholders[key] = placeholder = f"<{detector.kind}_{number}>"
            self.originals[placeholder] = value
        return self._placeholders[key]

    def body(self, body: dict) -> None:
        """Redact, in place, the text a request body sends the model (any endpoint's)."""
        for message in body.get("messages") or ():
            if isinstance(message, dict):
                self._message(message)
        for key in ("prompt", "instructions"):
            if isinstance(body.get(key), str):
                body[key] = self.text(body[key])
            elif isinstance(body.get(key), list):
                body[key] = [self.text(p) if isinstance(p, str) else p for p in body[key]]
        if isinstance(body.get("input"), str):
            body["input"] = self.text(body["input"])
        elif isinstance(body.get("input"), list):  # Responses input items, or the texts to embed
            body["input"] = [self.text(item) if isinstance(item, str) else item for item in body["input"]]
            for item in body["input"]:
                if isinstance(item, dict):
                    self._message(item)

    def _message(self, message: dict) -> None:
        """A chat message or Responses input item: its content (text or parts), tool-call arguments, output."""
        for key in ("content", "output", "arguments"):
            if isinstance(message.get(key), str):
                message[key] = self.text(message[key])
            elif isinstance(message.get(key), list):
                for part in message[key]:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = self.text(part["text"])
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                function["arguments"] = self.text(function["arguments"])

    def restore(self, raw: bytes) -> bytes:
        """JSON bytes with each placeholder put back as its JSON-escaped original."""
        for placeholder, value in self.originals.items():
            raw = raw.replace(placeholder.encode(), orjson.dumps(value)[1:-1])
        return raw
