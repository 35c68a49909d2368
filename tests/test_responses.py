"""`POST /v1/responses`: the OpenAI SDK's Responses calls, translated to chat and recorded like chat."""

import openai
import pytest
from openai.types.responses import Response

from flywheel.proxy.errors import ApiError
from flywheel.proxy.responses import chat_messages, chat_request
from tests.test_proxy import sdk

WEATHER = {"type": "function", "name": "get_weather", "description": "weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_input_items_become_chat_messages():
    messages = chat_messages({"instructions": "be brief", "input": [
        {"role": "developer", "content": "use tools"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather in"},
                                                        {"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "checking"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]},
    ]})
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "use tools"},
        {"role": "user", "content": "weather in\nParis?"},
        {"role": "assistant", "content": "checking", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
    ]
    assert chat_messages({"input": "hi"}) == [{"role": "user", "content": "hi"}]


def test_the_chat_request_carries_sampling_tools_and_format_and_drops_what_chat_lacks():
    chat = chat_request({
        "model": "m", "input": "hi", "max_output_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "store": True, "include": ["reasoning.encrypted_content"], "truncation": "auto", "stream": True,
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}}})
    assert chat == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0.5,
        "top_p": 0.9, "top_k": 5, "stream": True, "parallel_tool_calls": False,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                                    "parameters": WEATHER["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}}}


@pytest.mark.parametrize("body, field", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "web_search"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"role": "moderator", "content": "x"}]}, "role"),
    ({"input": "hi", "text": {"format": "json"}}, "text.format"),
    ({"model": "m"}, "input"),
])
def test_what_flywheel_cannot_honour_is_refused_naming_the_field(body, field):
    with pytest.raises(ApiError, match=field) as refused:
        chat_request(body)
    assert refused.value.status == 400


async def test_a_plain_response_is_recorded_with_exact_tokens(proxy, upstream):
    client = sdk(proxy, "/agents/solver/v1", default_headers={"X-Flywheel-Task": "t-1"})
    raw = await client.responses.with_raw_response.create(
        model="m", instructions="answer briefly", input="what is two plus two", max_output_tokens=3,
        metadata={"episode": "ep-r", "ticket": "17"})
    reply = raw.parse()
    Response.model_validate(reply.model_dump())  # every required field is there
    assert reply.output_text == " w0 w1 w2" and reply.status == "incomplete"  # cut at max_output_tokens
    assert reply.incomplete_details.reason == "max_output_tokens" and reply.metadata == {"ticket": "17"}
    sent = upstream.received[-1]
    assert sent["messages"] == [{"role": "system", "content": "answer briefly"},
                                {"role": "user", "content": "what is two plus two"}]
    assert sent["max_tokens"] == 3 and "metadata" not in sent and "instructions" not in sent
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["endpoint"] == "responses" and row["agent"] == "solver" and row["episode_id"] == "ep-r"
    assert row["call_id"] == raw.headers["X-Flywheel-Call"]
    assert await proxy.rows("SELECT task_id FROM episodes") == [{"task_id": "t-1"}]
    assert row["completion_token_ids"] == [1000, 1001, 1002] and len(row["prompt_token_ids"]) == 8
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.total_tokens) == (8, 3, 11)
    assert row["completion_logprobs"] == [-0.125, -0.25, -0.375] and row["status"] == 200
    assert row["request"]["input"] == "what is two plus two"  # as the client sent it


async def test_a_streamed_response_sends_the_event_sequence_the_sdk_parses(proxy):
    client = sdk(proxy, "/agents/writer/episodes/ep-s/v1")
    stream = await client.responses.create(model="m", input="hi", max_output_tokens=4, stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 4 + [
                        "response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == " w0 w1 w2 w3"
    final = events[-1].response
    assert final.output_text == " w0 w1 w2 w3" and final.usage.output_tokens == 4
    assert final.output[0].id == events[2].item.id == events[4].item_id  # one item id throughout
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["endpoint"] == "responses" and row["stream"] is True and row["agent"] == "writer"
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003] and row["ttft_ms"] is not None


@pytest.mark.parametrize("stream", [False, True])
async def test_function_calls_and_their_outputs_go_both_ways(proxy, upstream, stream):
    client = sdk(proxy, "/agents/planner/v1")
    history = [{"role": "user", "content": "weather in Paris?"},
               {"type": "function_call", "call_id": "c0", "name": "get_weather", "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "c0", "output": "rain"}]
    if stream:
        async with client.responses.stream(model="m", input=history, tools=[WEATHER]) as events:
            seen = [e.type async for e in events]
            reply = await events.get_final_response()
        assert "response.function_call_arguments.delta" in seen and "response.function_call_arguments.done" in seen
        assert seen[-1] == "response.completed"
    else:
        reply = await client.responses.create(model="m", input=history, tools=[WEATHER])
    [call] = [item for item in reply.output if item.type == "function_call"]
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_fake", '{"city": "Paris"}')
    assert reply.status == "completed" and reply.tools[0].name == "get_weather"
    sent = upstream.received[-1]
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "rain"}]
    [row] = await proxy.rows("SELECT response FROM calls")
    assert row["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_a_refused_field_is_a_400_in_openais_shape_and_nothing_is_recorded(proxy):
    client = sdk(proxy)
    with pytest.raises(openai.BadRequestError, match="previous_response_id") as refused:
        await client.responses.create(model="m", input="again", previous_response_id="resp_1")
    assert refused.value.body["code"] == "unsupported_field"
    with pytest.raises(openai.BadRequestError, match="store") as refused:
        await client.responses.retrieve("resp_1")
    assert refused.value.body["code"] == "unsupported_field"
    assert await proxy.rows("SELECT * FROM calls") == []
