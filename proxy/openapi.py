"""`GET /openapi.json`: OpenAPI 3.0 for Flywheel's own routes (episodes, feedback, SQL,
adapters, learner, health, metrics). The OpenAI routes it forwards are listed with the fields
Flywheel itself reads; their full schema is OpenAI's."""

from __future__ import annotations

from aiohttp import web

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "code": {"type": "string", "nullable": True}, "param": {"nullable": True}}}}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_NUMBER = {"type": "number"}
_OBJECT = {"type": "object"}
_ERASED = {"type": "object", "properties": {name: {"type": "integer"} for name in (
    "episodes", "calls", "feedback", "passthrough", "judge_episodes", "learner_episodes")}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _operation(summary: str, ok: int, reply: dict, body: dict | None = None, params: tuple[str, ...] = (),
               admin: bool = False, public: bool = False) -> dict:
    op: dict = {"summary": summary, "responses": {str(ok): {"description": "success", **_json(reply)}}}
    for status, what in (("400", "invalid request"), ("401", "missing or invalid key"),
                         ("403", "key not allowed here"), ("404", "not found"), ("415", "not JSON"),
                         ("503", "overloaded or the store cannot write")):
        op["responses"][status] = {"description": what, **_json(_ERROR)}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _NAME} for p in params]
    op["security"] = [] if public else [{"admin": []}] if admin else [{"bearer": []}, {"apiKey": []}]
    return op


def _inference(summary: str, required: list[str]) -> dict:
    body = {"type": "object", "required": required, "properties": {
        "model": {"type": "string"}, "stream": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1},
        "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "metadata": _OBJECT}}
    return {"post": _operation(summary, 200, _OBJECT, body)}


SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "Flywheel proxy", "version": "1",
             "description": "OpenAI-compatible logging proxy with episodes, outcomes and online LoRA learning."},
    "components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
        "admin": {"type": "http", "scheme": "bearer", "description": "an admin key"}}},
    "paths": {
        "/v1/chat/completions": _inference("chat completion, forwarded and recorded", ["model", "messages"]),
        "/v1/completions": _inference("completion, forwarded and recorded", ["model", "prompt"]),
        "/v1/responses": {"post": _operation("a Responses API call, forwarded as a chat completion and recorded", 200,
                                             _OBJECT, {"type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string"}, "stream": {"type": "boolean"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": _OBJECT}]},
            "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0}, "tools": {"type": "array", "items": _OBJECT},
            "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
            "metadata": _OBJECT}})},
        "/v1/responses/{response}": {
            method: _operation("refused: Flywheel keeps no responses (400)", 400, _ERROR, params=("response",))
            for method in ("get", "delete")},
        "/v1/models": {"get": _operation("the upstream's models", 200, _OBJECT)},
        "/v1/models/{model}": {"get": _operation("one of the upstream's models", 200, _OBJECT, params=("model",))},
        "/v1/embeddings": {"post": _operation("embeddings, forwarded and logged (passthrough)", 200, _OBJECT, {
            "type": "object", "required": ["model", "input"], "properties": {
                "model": {"type": "string"}, "input": {"oneOf": [
                    {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}})},
        "/tokenize": {"post": _operation("vLLM's tokenizer, forwarded and logged (passthrough)", 200, _OBJECT, {
            "type": "object", "required": ["model"], "properties": {
                "model": {"type": "string"}, "prompt": {"type": "string"}, "messages": {"type": "array"}}})},
        "/detokenize": {"post": _operation("vLLM's detokenizer, forwarded and logged (passthrough)", 200, _OBJECT, {
            "type": "object", "required": ["model", "tokens"], "properties": {
                "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}}})},
        "/v1/episodes": {"post": _operation("open an episode", 201, _OBJECT, {
            "type": "object", "properties": {"agent": _NAME, "task": _NAME, "metadata": _OBJECT}})},
        "/v1/episodes/{episode}": {
            "get": _operation("an episode with its calls and feedback", 200, _OBJECT, params=("episode",)),
            "delete": _operation("erase an episode: its calls, feedback and the learner's copy (audited)", 200,
                                 _ERASED, params=("episode",), admin=True)},
        "/v1/admin/reload": {"post": _operation(
            "read the configuration again: keys, agent rules and redaction take effect now (audited)", 200, {
                "type": "object", "properties": {"changed": {"type": "array", "items": {"type": "string"}},
                                                 "needs_restart": {"type": "array", "items": {"type": "string"}}}},
            admin=True)},
        "/v1/erase": {"post": _operation("erase every episode whose metadata has these values (audited)", 200,
                                         _ERASED, {"type": "object", "required": ["metadata"], "properties": {
                                             "metadata": {"type": "object", "minProperties": 1,
                                                          "additionalProperties": {"oneOf": [
                                                              {"type": "string"}, _NUMBER]}}}}, admin=True)},
        "/v1/episodes/{episode}/feedback": {"post": _operation(
            "post an outcome (a reward, or infra_error: true for a failure outside the model)", 200, _OBJECT, {
            "type": "object", "anyOf": [{"required": ["reward"]}, {"required": ["infra_error"]}], "properties": {
                "reward": _NUMBER, "dims": {"type": "object", "additionalProperties": _NUMBER},
                "infra_error": {"type": "boolean"}, "call_id": {"type": "string"}, "source": {"type": "string"},
                "idempotency_key": {"type": "string"}}},
            params=("episode",))},
        "/v1/episodes/{episode}/close": {"post": _operation("close an episode", 200, _OBJECT, _OBJECT,
                                                            params=("episode",))},
        "/v1/sql": {"post": _operation("one read-only SQL query on the store", 200, {
            "type": "object", "properties": {"columns": {"type": "array"}, "types": {"type": "array"},
                                             "rows": {"type": "array"}, "truncated": {"type": "boolean"}}}, {
            "type": "object", "required": ["query"], "properties": {
                "query": {"type": "string"}, "max_rows": {"type": "integer", "minimum": 0}}}, admin=True)},
        "/v1/adapters": {
            "get": _operation("adapter versions per agent", 200, _OBJECT, admin=True),
            "post": _operation("register an adapter version: active at once, or a canary candidate", 201, _OBJECT, {
                "type": "object", "required": ["agent", "path"], "properties": {
                    "agent": _NAME, "path": {"type": "string"}, "base_model": {"type": "string"},
                    "canary": {"type": "boolean"}, "train_run": _OBJECT}}, admin=True)},
        **{f"/v1/adapters/{{agent}}/{action}": {"post": _operation(summary, 200, _OBJECT, {
            "type": "object", "properties": {"reason": {"type": "string"}}}, params=("agent",), admin=True)}
           for action, summary in (("rollback", "roll an agent back one version"),
                                   ("promote", "make the agent's candidate active now"),
                                   ("reject", "take the agent's candidate off its canary slice"))},
        "/v1/learner/train": {"post": _operation("an update now (NDJSON events)", 200, _OBJECT, {
            "type": "object", "properties": {"wait": {"type": "boolean"}, "force": {"type": "boolean"}}},
            admin=True)},
        "/v1/learner/runs": {"post": _operation("record an update the learner's guards held back", 201, _OBJECT, {
            "type": "object", "required": ["train_run"], "properties": {"train_run": _OBJECT}}, admin=True)},
        "/v1/learner/status": {"get": _operation("the learner's buffer and the feed", 200, _OBJECT, admin=True)},
        "/v1/grader": {"get": _operation("the grading service: counts and episodes it gave up on", 200, _OBJECT,
                                         admin=True)},
        "/v1/grader/regrade": {"post": _operation("re-grade stored episodes (flywheel grade)", 200, _OBJECT, {
            "type": "object", "properties": {"since": {"type": "string"}, "grader_version": {"type": "string"}}},
            admin=True)},
        "/v1/dashboard": {"get": _operation("the live page's data: reward per version, agents, updates, episodes",
                                            200, _OBJECT, admin=True)},
        "/ui": {"get": {"summary": "the live page", "security": [], "responses": {"200": {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/ui/{file}": {"get": {"summary": "the live page's script and style", "security": [], "parameters": [
            {"name": "file", "in": "path", "required": True, "schema": _NAME}], "responses": {
            "200": {"description": "the file", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "404": {"description": "no such file", **_json(_ERROR)}}}},
        "/v1/grader/calibrate": {"post": _operation("the grader's agreement with human labels", 200, _OBJECT, {
            "type": "object", "required": ["labels"], "properties": {"labels": {"type": "array", "items": {
                "type": "object", "required": ["episode_id", "label"],
                "properties": {"episode_id": {"type": "string"}, "label": _NUMBER}}}}}, admin=True)},
        "/healthz": {"get": _operation("alive", 200, _OBJECT, public=True)},
        "/readyz": {"get": _operation("ready: upstream, store, adapters, feed", 200, _OBJECT, public=True)},
        "/openapi.json": {"get": _operation("this description", 200, _OBJECT, public=True)},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": [{"admin": []}],
                             "responses": {"200": {"description": "text exposition format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    },
}


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
