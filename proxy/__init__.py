"""The proxy: an aiohttp OpenAI-compatible server in front of vLLM. The server only.

    app.py          the application: routes, one cleanup context per resource, `run`
    state.py        ProxyState: what handlers share, complete when the app serves
    config.py       [proxy] settings, each field documented
    auth.py         keys per route, JSON-only POSTs, Host on loopback, request limits
    routes/         one module per group of routes: completions (and responses), passthrough,
                    episodes, sql, adapters, learner, ui (the live page and its data)
    ui/             the live page's static files (HTML, JS, CSS)
    attribution.py  which agent, episode and task a call belongs to
    capture.py      what is asked of the upstream, recorded, and handed back (pure)
    responses.py    the Responses API over chat completions: requests, objects, SSE events (pure)
    conversation.py a recorded call as chat messages, sent and returned (pure)
    tracing.py      OpenTelemetry GenAI spans per call (the `otel` extra)
    grader.py       [grader]: closed episodes scored by the team's grading service
    judge.py        the built-in LLM judge, behind the grader's contract
    agreement.py    a grader's agreement with human labels: Spearman, pair accuracy (pure)
    upstream.py     the hot-path HTTP/1.1 client to the upstream
    admin.py        the upstream's other calls (adapter loading, /v1/models, pass-through)
    registry.py     which adapter version serves each agent; hot-swapping in vLLM
    feed.py         finished episodes to the learner over gRPC
    errors.py       OpenAI-shaped errors
    metrics.py      Prometheus metrics (/metrics)
    openapi.py      the OpenAPI description of Flywheel's own routes (/openapi.json)

Imports: flywheel.store and flywheel.protos only (never the learner, never the command line).
"""
