"""The examples' rule graders behind Flywheel's grader contract (`[grader] kind = "endpoint"`).

A grading service of the kind a team runs: it knows the right answers (here: the example's
task split, by question) and scores what the agents did from the episode alone, as Flywheel
sends it: the first agent's call holds the question (its last user message) and its answer
(the expression or the parsed dates), the last agent's call holds the reply. An item it
cannot place (no known question in it) scores 0: an answer to an unknown question is wrong.
A comparison group's item that ends at the first agent's call (a shadow sample of it, or the
call it resamples) is scored on that step alone: is the expression (or the count) right.

    python -m examples.grader_service --task arithmetic --seed 0 --port 8500
    # flywheel.toml:  [grader]  kind = "endpoint"  url = "http://127.0.0.1:8500/grade"  name = "rules"
"""

from __future__ import annotations

import argparse

from aiohttp import web

from examples import arithmetic, calendar_task

# task -> (its split, its grader, the dimension that scores the first agent's step)
SPLITS = {"arithmetic": (arithmetic.task_split, arithmetic.grade, "expression_correct"),
          "calendar": (calendar_task.task_split, calendar_task.grade, "count_correct")}


def _text(message: dict | None) -> str:
    content = (message or {}).get("content")
    return content if isinstance(content, str) else ""


def score(item: dict, tasks: dict[str, object], grade, first_step: str) -> float:
    """The rule grader's reward for one contract item (0 when its question is not a known task);
    a comparison group's item of the first call alone: that step's `first_step` dimension."""
    calls = item["calls"]
    if not calls:
        return 0.0
    asked = _text(calls[0]["messages"][-1] if calls[0]["messages"] else None)
    task = tasks.get(asked)
    if task is None:
        return 0.0
    reward, dims = grade(task, _text(calls[-1]["completion"]), _text(calls[0]["completion"]))
    return dims[first_step] if item.get("target_call") and len(calls) == 1 else reward


def make_app(task: str, seed: int, train_tasks: int, heldout: int) -> web.Application:
    split, grade, first_step = SPLITS[task]
    train, held = split(seed, train_tasks, heldout)
    tasks = {t.question: t for t in train + held}

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"scores": [score(item, tasks, grade, first_step) for item in body["items"]]})

    app = web.Application()
    app.router.add_post("/grade", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(SPLITS), default="arithmetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-tasks", dest="train_tasks", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--port", type=int, default=8500)
    args = parser.parse_args()
    web.run_app(make_app(args.task, args.seed, args.train_tasks, args.heldout), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
