"""Flywheel: an online-learning sidecar for multi-agent LLM systems.

One package, `flywheel`, installed from the repository's top-level folders (each one layer
with one job; imports flow downwards only):

    cli/          flywheel            the `flywheel` command: settings, `up` and its supervisor,
                                      vLLM launching, `sql`, `report`, `export`, the HTTP client (imports all below)
    proxy/        flywheel.proxy      the OpenAI-compatible server (imports store, protos)
    store/        flywheel.store      DuckDB schema, batched writer, read-only SQL, rows <-> protos (imports protos)
    protos/       flywheel.protos     the gRPC contract between proxy and learner (imports nothing of ours)
    learner/      flywheel.learner    credit, advantages, GRPO loss, LoRA trainer, publishing (imports protos)
    vllm_plugin/  flywheel.vllm_plugin  grouped CPU LoRA matmuls, loaded only by vLLM (imports nothing of ours)

This folder (cli/) is the package's top: commands.py (argparse, exit codes), settings.py (TOML +
env + flags), up.py, supervisor.py, vllm_server.py, sql.py, report.py, export.py, client.py.
"""
