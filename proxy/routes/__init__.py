"""The proxy's HTTP routes, one module per group; `flywheel.proxy.app` wires them.

    completions.py  /v1/chat/completions, /v1/completions, /v1/models (also under /agents/... prefixes)
    episodes.py     /v1/episodes: create, feedback, close, read
    sql.py          /v1/sql: read-only queries on the live store
    adapters.py     /v1/adapters: list, register, roll back
    learner.py      /v1/learner/train and /v1/learner/status, through the feed's gRPC channel
"""
