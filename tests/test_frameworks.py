"""Agent frameworks through Flywheel, each changed only as the README's table says, against the
fake vLLM: every call is recorded with its agent, episode and exact tokens."""

import asyncio

import openai
import pytest

from tests.test_responses import WEATHER

agents = pytest.importorskip("agents")  # the test extra installs the frameworks
langchain_openai = pytest.importorskip("langchain_openai")
smolagents = pytest.importorskip("smolagents")
dspy = pytest.importorskip("dspy")


@pytest.fixture
def openai_env(proxy, monkeypatch):
    """What a team sets to put Flywheel in front of an app: the OpenAI base URL and a key."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"{proxy.url}/agents/assistant/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-flywheel")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # else the SDK uploads traces to OpenAI
    # the Agents SDK keeps one HTTP client per process, bound to the event loop it first ran in;
    # each test has its own loop and proxy, so each gets a client of its own (made from the env)
    agents.set_default_openai_client(openai.AsyncOpenAI(), use_for_tracing=False)
    return proxy


async def _calls(proxy):
    return await proxy.rows("SELECT endpoint, agent, episode_id, stream, status, completion_token_ids, response "
                            "FROM calls ORDER BY created_at")


async def test_the_agents_sdk_default_runner_goes_through_the_responses_api(openai_env):
    agent = agents.Agent(name="assistant", instructions="Answer briefly.", model="m",
                         model_settings=agents.ModelSettings(metadata={"episode": "ep-agents"}))
    result = await agents.Runner.run(agent, "what is two plus two")
    assert result.final_output == " w0 w1 w2 w3"
    [row] = await _calls(openai_env)
    assert (row["endpoint"], row["agent"], row["episode_id"], row["status"]) == (
        "responses", "assistant", "ep-agents", 200)
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003]


async def test_the_agents_sdk_streams_and_calls_function_tools(openai_env):
    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"sunny in {city}"

    agent = agents.Agent(name="assistant", model="m", tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(metadata={"episode": "ep-tools"}))
    run = agents.Runner.run_streamed(agent, "weather in Paris?")
    async for _ in run.stream_events():
        pass
    assert run.final_output == "sunny in Paris"  # the fake's tool call carried {"city": "Paris"}
    [row] = await _calls(openai_env)
    assert row["endpoint"] == "responses" and row["stream"] is True and row["episode_id"] == "ep-tools"
    assert row["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
async def test_langchain_with_the_responses_api(openai_env, stream):
    model = langchain_openai.ChatOpenAI(model="m", use_responses_api=True,
                                        default_headers={"X-Flywheel-Episode": "ep-lc"})

    def run():
        if stream:
            return "".join(chunk.text for chunk in model.stream("what is two plus two"))
        return model.invoke("what is two plus two").text

    assert await asyncio.to_thread(run) == " w0 w1 w2 w3"
    [row] = await _calls(openai_env)
    assert (row["endpoint"], row["episode_id"], row["stream"]) == ("responses", "ep-lc", stream)
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003]


async def test_langchain_tools_through_the_responses_api(openai_env):
    model = langchain_openai.ChatOpenAI(model="m", use_responses_api=True).bind_tools([WEATHER])
    reply = await asyncio.to_thread(model.invoke, "weather in Paris?")
    assert reply.tool_calls[0]["name"] == "get_weather" and reply.tool_calls[0]["args"] == {"city": "Paris"}
    [row] = await _calls(openai_env)
    assert row["endpoint"] == "responses"


async def test_smolagents_openai_server_model(proxy):
    model = smolagents.OpenAIServerModel(model_id="m", api_base=f"{proxy.url}/agents/coder/v1", api_key="sk-flywheel",
                                         client_kwargs={"default_headers": {"X-Flywheel-Episode": "ep-smol"}})
    reply = await asyncio.to_thread(model.generate, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert reply.content == " w0 w1 w2 w3"
    [row] = await _calls(proxy)
    assert (row["endpoint"], row["agent"], row["episode_id"]) == ("chat.completions", "coder", "ep-smol")
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003]


async def test_dspy_through_litellm(proxy):
    lm = dspy.LM("openai/m", api_base=f"{proxy.url}/agents/extractor/v1", api_key="sk-flywheel", cache=False,
                 extra_headers={"X-Flywheel-Episode": "ep-dspy"})
    [text] = await asyncio.to_thread(lm, "hi")
    assert text == " w0 w1 w2 w3"
    [row] = await _calls(proxy)
    assert (row["endpoint"], row["agent"], row["episode_id"]) == ("chat.completions", "extractor", "ep-dspy")
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003]


async def test_an_agent_left_on_the_sdks_default_model_is_served_by_serve_model(start_proxy, upstream, monkeypatch):
    proxy = await start_proxy(serve_model="m")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{proxy.url}/agents/assistant/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-flywheel")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    agents.set_default_openai_client(openai.AsyncOpenAI(), use_for_tracing=False)
    result = await agents.Runner.run(agents.Agent(name="assistant", instructions="Be brief."), "hi")
    assert result.final_output == " w0 w1 w2 w3" and upstream.received[-1]["model"] == "m"
    [row] = await proxy.rows("SELECT model, adapter FROM calls")
    assert row["model"] not in (None, "m") and row["adapter"] == "m"  # what the app asked for, what served it
