"""Redaction: detectors, placeholders, what the model and the store see, and the restored response."""

import json

import openai
import pytest

from flywheel.proxy.redaction import Redaction, UnknownDetector, detectors, luhn_valid

CARD = "4111 1111 1111 1111"  # a test Visa number: passes Luhn


def redact(text: str, *names: str) -> tuple[str, Redaction]:
    redaction = Redaction(detectors(names or ("email", "card", "ipv4", "phone")))
    return redaction.text(text), redaction


def test_each_detector_and_the_luhn_check():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    text, r = redact(f"mail a.b+c@mail.example.org or x@y.io, card {CARD}, not 4111 1111 1111 1112, "
                     "host 10.0.0.255 not 999.1.1.1, call +1 (415) 555-0100 or 2024-01-02")
    assert text == ("mail <EMAIL_1> or <EMAIL_2>, card <CARD_1>, not 4111 1111 1111 1112, "
                    "host <IPV4_1> not 999.1.1.1, call <PHONE_1> or 2024-01-02")
    assert r.counts == {"email": 2, "card": 1, "ipv4": 1, "phone": 1}
    assert r.originals["<CARD_1>"] == CARD and r.originals["<PHONE_1>"] == "+1 (415) 555-0100"


def test_a_value_keeps_its_placeholder_and_regexes_come_last():
    text, r = redact("u-17 wrote to a@b.co; a@b.co replied to u-18", "email", r"regex:u-\d+")
    assert text == "<REDACTED_1> wrote to <EMAIL_1>; <EMAIL_1> replied to <REDACTED_2>"
    assert r.counts == {"email": 2, r"regex:u-\d+": 2}
    with pytest.raises(UnknownDetector, match="detectors are"):
        detectors(("ssn",))
    with pytest.raises(UnknownDetector, match="not a regular expression"):
        detectors(("regex:(",))


def test_every_text_field_a_request_sends_the_model():
    r = Redaction(detectors(("email",)))
    body = {"messages": [{"role": "system", "content": "to a@b.co"},
                         {"role": "user", "content": [{"type": "text", "text": "c@d.co"}, {"type": "image_url"}]},
                         {"role": "assistant", "tool_calls": [{"function": {"arguments": '{"to": "a@b.co"}'}}]},
                         {"role": "tool", "content": "sent to e@f.co"}],
            "prompt": ["g@h.co", 3], "instructions": "i@j.co", "input": [{"type": "message", "content": "a@b.co"},
                                                                          {"type": "function_call_output", "output": "k@l.co"}]}
    r.body(body)
    assert "@" not in json.dumps(body)
    assert r.counts == {"email": 8} and len(r.originals) == 6  # a@b.co three times, as <EMAIL_1>
    assert r.restore(b'{"content": "<EMAIL_1> \\u003c"}') == b'{"content": "a@b.co \\u003c"}'


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_and_the_store_see_placeholders_and_the_client_may_get_originals(
        start_proxy, upstream, stream):
    proxy = await start_proxy(redact=("email", "card"), redact_restore=True)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    prompt = f"write to jane@corp.example with card {CARD}"
    echo = {"fake_echo": True}  # the fake upstream answers with the prompt's words
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True, extra_body=echo)]
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = (await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                       extra_body=echo)).choices[0].message.content
    seen = json.dumps(upstream.received[-1])
    assert "jane@corp.example" not in seen and "4111" not in seen and "<EMAIL_1>" in seen and "<CARD_1>" in seen
    [row] = await proxy.rows("SELECT request, response, redactions, prompt_token_ids FROM calls")
    stored = json.dumps(row["request"]) + json.dumps(row["response"])
    assert "jane@corp.example" not in stored and "<EMAIL_1>" in stored and row["redactions"] == {"email": 1, "card": 1}
    assert answer == prompt  # the placeholders the model repeated, restored for the client alone
