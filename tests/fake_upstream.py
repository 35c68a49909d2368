"""An OpenAI-compatible upstream that answers like vLLM, for tests and bench/proxy.py.

Deterministic: the reply to any request is `max_tokens` tokens " w0", " w1", ... with ids
1000, 1001, ... (finish reason `length`), or without `max_tokens` 4 of them (`stop`); the prompt's token ids are
1..len(words of the prompt), or the prompt itself when it is token ids. A completion with `n` (up to 16)
gives that many choices, choice k with k tokens fewer and ids 100 * k higher. Like
vLLM it returns `prompt_token_ids`/`token_ids` only when `return_token_ids` is set and
logprobs only when asked. With `tools` in the request (and tool_choice not "none") it
answers with a call to the first tool; a whole chat answer takes its text from `app[REPLIES]`
when a test queued some. Models named `fail-<status>` answer with that
error status; the model `not-json` answers 200 with a plain-text body. A body field `fake_delay_ms` delays one answer. LoRA adapters can be loaded and unloaded as in vLLM; a name ending in
`-v<N>` that is not loaded is a 404. A `priority` is a 400 once `app[PRIORITY_SCHEDULING]` is
[False], as in vLLM without --scheduling-policy priority. It keeps the bodies it received in `app[RECEIVED]` for tests to inspect.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from aiohttp import web

RECEIVED = web.AppKey("received", list)
AUTHORIZATIONS = web.AppKey("authorizations", list)  # the Authorization header of each call, None if absent
LORAS = web.AppKey("loras", dict)  # served name -> path, as loaded through /v1/load_lora_adapter
LORA_CALLS = web.AppKey("lora_calls", list)  # ("load" | "unload", name) in arrival order
DELAY_S = web.AppKey("delay_s", float)
LOAD_FAILURES = web.AppKey("load_failures", list)  # [n]: the next n loads answer 500, as a vLLM still starting
UNLOAD_DELAY_S = web.AppKey("unload_delay_s", list)  # [seconds] each unload takes (a list: settable in a test)
TOOL_ARGS = ('{"city": ', '"Paris"}')
PRIORITY_SCHEDULING = web.AppKey("priority_scheduling", list)  # [False]: a request `priority` is a 400, as in vLLM's fcfs
REPLIES = web.AppKey("replies", list)  # texts the next whole chat answers carry, in order (a judge's JSON, ...)
NO_RESPONSE_FORMAT = web.AppKey("no_response_format", list)  # [True]: refuse response_format, as servers without it


def _prompt_ids(body: dict) -> list[int]:
    if isinstance(body.get("prompt"), list) and all(isinstance(t, int) for t in body["prompt"]):
        return list(body["prompt"])  # token ids, as vLLM takes them
    if "messages" in body:
        text = " ".join(str(m.get("content") or "") for m in body["messages"])
    else:
        text = body["prompt"] if isinstance(body["prompt"], str) else " ".join(map(str, body["prompt"]))
    return list(range(1, len(text.split()) + 2))


def _invalid(body: dict, chat: bool) -> str | None:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return "'messages' must be a list of objects"
    elif not isinstance(body.get("prompt"), (str, list)):
        return "'prompt' must be a string or a list"
    if not isinstance(body.get("model", ""), str):
        return "'model' must be a string"
    return None


def _tokens(body: dict, choice: int = 0) -> list[tuple[int, str, float]]:
    """Choice k of n: k tokens fewer, ids 100 * k higher (so the choices differ). With "fake_echo":
    true, the last message's words instead, one token each."""
    if body.get("fake_echo") and body.get("messages"):
        words = str(body["messages"][-1].get("content")).split(" ")
        return [(1000 + i, word if i == 0 else f" {word}", -0.125) for i, word in enumerate(words)]
    n = min(body.get("max_tokens") or body.get("max_completion_tokens") or 4, 64)  # a model's length limit
    return [(1000 + 100 * choice + i, f" w{i}", -0.125 * (i + 1)) for i in range(max(1, n - choice))]


def _finish(body: dict) -> str:
    """Cut at the client's limit, or stopped on its own."""
    return "length" if body.get("max_tokens") or body.get("max_completion_tokens") else "stop"


def _wants_tool(body: dict) -> bool:
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def _chat_logprobs(tokens) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for _, t, lp in tokens]}


def _completion_logprobs(tokens) -> dict:
    return {"tokens": [t for _, t, _ in tokens], "token_logprobs": [lp for _, _, lp in tokens],
            "top_logprobs": [{t: lp} for _, t, lp in tokens], "text_offset": []}


def _tool_call(body: dict) -> dict:
    name = body["tools"][0]["function"]["name"]
    return {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": "".join(TOOL_ARGS)}}


def _whole(body: dict, chat: bool, reply: str | None = None) -> dict:
    tokens = _tokens(body)
    ids = body.get("return_token_ids")
    text = reply if reply is not None else "".join(t for _, t, _ in tokens)
    usage = {"prompt_tokens": len(_prompt_ids(body)), "completion_tokens": len(tokens),
             "total_tokens": len(_prompt_ids(body)) + len(tokens)}
    if chat:
        tool = _wants_tool(body)
        message = {"role": "assistant", "content": None if tool else text,
                   "tool_calls": [_tool_call(body)] if tool else []}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if tool else _finish(body),
                  "logprobs": _chat_logprobs(tokens) if body.get("logprobs") else None,
                  "token_ids": [i for i, _, _ in tokens] if ids else None}
        out = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
               "choices": [choice], "usage": usage,
               "prompt_token_ids": _prompt_ids(body) if ids else None}
    else:
        choices = []
        for k in range(min(int(body.get("n") or 1), 16)):  # a server's own limit on choices
            tokens = _tokens(body, k)
            choices.append({"index": k, "text": "".join(t for _, t, _ in tokens), "finish_reason": _finish(body),
                            "logprobs": _completion_logprobs(tokens) if body.get("logprobs") is not None else None,
                            "token_ids": [i for i, _, _ in tokens] if ids else None,
                            "prompt_token_ids": _prompt_ids(body) if ids else None})
        out = {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
               "choices": choices, "usage": usage}
    return out


def _chunks(body: dict, chat: bool):
    """The SSE chunks vLLM would send, in order."""
    tokens = _tokens(body)
    ids = body.get("return_token_ids")
    base = {"id": "fake-stream", "model": body.get("model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
               **({"prompt_token_ids": _prompt_ids(body)} if ids else {})}
        if _wants_tool(body):
            call = _tool_call(body)
            pieces = [{"index": 0, "id": call["id"], "type": "function",
                       "function": {"name": call["function"]["name"], "arguments": TOOL_ARGS[0]}},
                      {"index": 0, "function": {"arguments": TOOL_ARGS[1]}}]
            for k, piece in enumerate(pieces):
                part = tokens[k * len(tokens) // 2:(k + 1) * len(tokens) // 2]
                yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [piece]},
                       "logprobs": _chat_logprobs(part) if body.get("logprobs") else None,
                       **({"token_ids": [i for i, _, _ in part]} if ids else {})}]}
            finish = "tool_calls"
        else:
            for tok in tokens:
                yield {**base, "choices": [{"index": 0, "delta": {"content": tok[1]},
                       "logprobs": _chat_logprobs([tok]) if body.get("logprobs") else None,
                       **({"token_ids": [tok[0]]} if ids else {})}]}
            finish = _finish(body)
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    else:
        for k, tok in enumerate(tokens):
            choice = {"index": 0, "text": tok[1],
                      "logprobs": _completion_logprobs([tok]) if body.get("logprobs") is not None else None,
                      "finish_reason": _finish(body) if k == len(tokens) - 1 else None}
            if ids:
                choice["token_ids"] = [tok[0]]
                if k == 0:
                    choice["prompt_token_ids"] = _prompt_ids(body)
            yield {**base, "choices": [choice]}
    if (body.get("stream_options") or {}).get("include_usage"):
        n_prompt = len(_prompt_ids(body))
        yield {**base, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                                                "total_tokens": n_prompt + len(tokens)}}


def _handler(chat: bool):
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request.app[RECEIVED].append(body)
        request.app[AUTHORIZATIONS].append(request.headers.get("Authorization"))
        problem = _invalid(body, chat)
        if problem:  # as vLLM: a 400 for a body it cannot serve
            return web.json_response({"error": {"message": problem, "type": "BadRequestError", "code": 400}},
                                     status=400)
        delay_s = float(body.get("fake_delay_ms", 0)) / 1000 or request.app[DELAY_S]
        if delay_s:
            await asyncio.sleep(delay_s)
        model = str(body.get("model") or "")
        if re.search(r"-v\d+$", model) and model not in request.app[LORAS]:
            return web.json_response({"error": {"message": f"The model `{model}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        if model.startswith("fail-"):
            status = int(model.split("-")[1])
            return web.json_response({"error": {"message": f"fake failure {status}", "type": "BadRequestError",
                                                "code": status}}, status=status)
        if model == "not-json":
            return web.Response(text="upstream garbage")
        if body.get("priority") and not request.app[PRIORITY_SCHEDULING][0]:
            return web.json_response({"error": {"message": "Got priority 10 but Priority scheduling is not enabled.",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        if body.get("response_format") and request.app[NO_RESPONSE_FORMAT][0]:
            return web.json_response({"error": {"message": "response_format is not supported", "code": 400}},
                                     status=400)
        if not body.get("stream"):
            replies = request.app[REPLIES]
            return web.json_response(_whole(body, chat, replies.pop(0) if chat and replies else None))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_delay_s = float(body.get("fake_chunk_delay_ms", 0)) / 1000  # a slow generation, token by token
        for chunk in _chunks(body, chat):
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if chunk_delay_s:
                await asyncio.sleep(chunk_delay_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handle


async def _load_lora(request: web.Request) -> web.Response:
    body = await request.json()
    name = body["lora_name"]
    request.app[LORA_CALLS].append(("load", name))
    if request.app[LOAD_FAILURES][0]:
        request.app[LOAD_FAILURES][0] -= 1
        return web.json_response({"error": {"message": "engine not ready"}}, status=500)
    if name in request.app[LORAS]:
        return web.json_response({"error": {"message": f"The lora adapter '{name}' has already been loaded."}},
                                 status=400)
    if not Path(body["lora_path"], "adapter_config.json").is_file():
        return web.json_response({"error": {"message": f"No adapter found for {body['lora_path']}"}}, status=400)
    request.app[LORAS][name] = body["lora_path"]
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora(request: web.Request) -> web.Response:
    name = (await request.json())["lora_name"]
    request.app[LORA_CALLS].append(("unload", name))
    await asyncio.sleep(request.app[UNLOAD_DELAY_S][0])
    if request.app[LORAS].pop(name, None) is None:
        return web.json_response({"error": {"message": f"The lora adapter '{name}' cannot be found."}}, status=404)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _models(request: web.Request) -> web.Response:
    # as vLLM: the base model, then every loaded LoRA adapter with the directory it came from
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": int(time.time()), "owned_by": "fake", "root": root}
        for name, root in [("fake-model", "fake-model"), *request.app[LORAS].items()]]})


def _validated(handler):
    """As vLLM: a body it cannot use is a 400, never a 500."""
    async def handle(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except (ValueError, TypeError, KeyError, AttributeError) as bad:
            return web.json_response({"error": {"message": f"invalid request: {bad}", "code": 400}}, status=400)

    return handle


@_validated
async def _embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    texts = [body["input"]] if isinstance(body.get("input"), str) else list(body["input"])
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("'input' must be a string or a list of strings")
    return web.json_response({"object": "list", "model": body.get("model"), "data": [
        {"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5]} for i, t in enumerate(texts)],
        "usage": {"prompt_tokens": sum(len(t.split()) for t in texts), "total_tokens": 0}})


@_validated
async def _tokenize(request: web.Request) -> web.Response:
    body = await request.json()
    if not isinstance(body.get("prompt"), str):
        return web.json_response({"error": {"message": "'prompt' must be a string", "code": 400}}, status=400)
    tokens = list(range(1, len(body["prompt"].split()) + 1))
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": 2048})


@_validated
async def _detokenize(request: web.Request) -> web.Response:
    return web.json_response({"prompt": " ".join(f"w{t}" for t in (await request.json())["tokens"])})


def make_app(delay_s: float = 0.0) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = []
    app[AUTHORIZATIONS] = []
    app[DELAY_S] = delay_s
    app[LORAS] = {}
    app[LORA_CALLS] = []
    app[UNLOAD_DELAY_S] = [0.0]
    app[LOAD_FAILURES] = [0]
    app[REPLIES] = []
    app[NO_RESPONSE_FORMAT] = [False]
    app[PRIORITY_SCHEDULING] = [True]
    app.router.add_post("/v1/load_lora_adapter", _load_lora)
    app.router.add_post("/v1/unload_lora_adapter", _unload_lora)
    app.router.add_post("/v1/chat/completions", _handler(chat=True))
    app.router.add_post("/v1/completions", _handler(chat=False))
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    return app


def main() -> None:
    """Serve the fake on its own (bench/proxy.py runs it as a separate process)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    web.run_app(make_app(args.delay_ms / 1000), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
