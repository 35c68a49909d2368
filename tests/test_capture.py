"""Pure capture functions: what is asked of the upstream, recorded, and handed back."""

import copy

from flywheel.proxy.capture import CHAT, COMPLETIONS, Capture, Wants, strip_unrequested, upstream_body
from tests.fake_upstream import _chunks, _whole


def test_upstream_body_asks_for_token_ids_and_logprobs_without_touching_the_client_body():
    body = {"model": "m", "messages": []}
    forward, wants = upstream_body(body, CHAT)
    assert forward["return_token_ids"] is True and forward["logprobs"] is True
    assert wants == Wants(token_ids=False, logprobs=False)
    assert "return_token_ids" not in body
    forward, wants = upstream_body({"prompt": "x", "logprobs": 3}, COMPLETIONS)
    assert forward["logprobs"] == 3 and wants.logprobs
    forward, _ = upstream_body({"prompt": "x"}, COMPLETIONS)
    assert forward["logprobs"] == 1


def test_strip_removes_only_what_the_client_did_not_ask_for():
    data = {"prompt_token_ids": [1], "choices": [{"token_ids": [5], "logprobs": {"content": []}}]}
    kept = copy.deepcopy(data)
    strip_unrequested(kept, CHAT, Wants(token_ids=True, logprobs=True))
    assert kept == data
    strip_unrequested(data, CHAT, Wants(token_ids=False, logprobs=True))
    assert data == {"choices": [{"logprobs": {"content": []}}]}
    strip_unrequested(data, CHAT, Wants(token_ids=False, logprobs=False))
    assert data == {"choices": [{"logprobs": None}]}


def _both_ways(body, endpoint):
    chat = endpoint == CHAT
    whole, streamed = Capture(endpoint), Capture(endpoint)
    whole.add(_whole(body, chat))
    for chunk in _chunks(body, chat):
        streamed.add(chunk)
    return whole, streamed


def test_streamed_and_whole_responses_record_the_same_tokens_and_text():
    for endpoint, body in ((CHAT, {"messages": [{"role": "user", "content": "a b c"}]}),
                           (COMPLETIONS, {"prompt": "a b c"})):
        body.update(return_token_ids=True, logprobs=True if endpoint == CHAT else 1, max_tokens=3)
        whole, streamed = _both_ways(body, endpoint)
        for cap in (whole, streamed):
            assert cap.prompt_token_ids == [1, 2, 3, 4]
            assert cap.completion_token_ids() == [1000, 1001, 1002]
            assert cap.completion_logprobs() == [-0.125, -0.25, -0.375]
            assert cap.first.finish_reason == "length"
            assert cap.completion_tokens() == 3
        assert whole.response_json()["choices"] == streamed.response_json()["choices"]


def test_streamed_tool_call_deltas_are_merged_into_one_call():
    body = {"messages": [{"role": "user", "content": "weather?"}], "return_token_ids": True, "logprobs": True,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}
    whole, streamed = _both_ways(body, CHAT)
    expected = [{"id": "call_fake", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert streamed.response_json()["choices"][0]["message"]["tool_calls"] == expected
    assert whole.response_json()["choices"][0]["message"]["tool_calls"] == expected
    assert streamed.completion_token_ids() == whole.completion_token_ids() == [1000, 1001, 1002, 1003]
    assert streamed.first.finish_reason == "tool_calls"


def test_upstream_without_token_ids_records_none_not_empty():
    cap = Capture(CHAT)
    cap.add({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})
    assert cap.completion_token_ids() is None and cap.prompt_token_ids is None
    assert cap.completion_tokens() is None
