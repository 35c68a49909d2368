"""The second example task, kept out of every tuning decision: weekday questions for two agents.

A **parser** turns "What day is it 3 days after Monday?" into a day and a signed offset
("Monday + 3"); a tool counts the days; a **replier** answers the user with a last line
`Answer: <Day>`. The grader gives 1 for the right weekday and 0 otherwise. Tasks come from a
seed, with disjoint train and held-out splits, like the arithmetic example. Nothing in
Flywheel's defaults was chosen by looking at this task: it exists to check them.
"""

from __future__ import annotations

import random
import re

from examples.agents import AgentClients
from examples.arithmetic import Task

MAX_OFFSET = 30  # days forward or back: 4 phrasings x 7 days x 30 = 840 distinct questions
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_PHRASES = (
    ("What day of the week is it {n} days after {day}?", 1),
    ("Today is {day}. What day will it be in {n} days?", 1),
    ("What day of the week was it {n} days before {day}?", -1),
    ("{n} days ago it was {day}. What day is it today?", 1),
)

PARSER_SYSTEM = "Rewrite the question as a weekday and a number of days, like: Monday + 3 or Friday - 2. Reply with only that."
PARSER_SHOTS = (("What day of the week is it 2 days after Tuesday?", "Tuesday + 2"),
                ("What day of the week was it 4 days before Sunday?", "Sunday - 4"))
REPLIER_SYSTEM = "Answer the question in one short sentence using the count, then a last line: Answer: <weekday>"
REPLIER_SHOT = ("Question: Today is Monday. What day will it be in 2 days?\nCount: Monday + 2 = Wednesday",
                "In 2 days it will be Wednesday.\nAnswer: Wednesday")


def task_split(seed: int, n_train: int, n_heldout: int) -> tuple[list[Task], list[Task]]:
    """Disjoint train and held-out weekday tasks, fixed by `seed`; `answer` is the weekday's index."""
    if n_train + n_heldout > len(_PHRASES) * len(DAYS) * MAX_OFFSET:
        raise ValueError(f"only {len(_PHRASES) * len(DAYS) * MAX_OFFSET} distinct weekday questions exist")
    rng = random.Random(seed)
    seen: set[str] = set()
    tasks: list[Task] = []
    while len(tasks) < n_train + n_heldout:
        phrase, sign = rng.choice(_PHRASES)
        day, n = rng.choice(DAYS), rng.randint(1, MAX_OFFSET)
        question = phrase.format(day=day, n=n)
        if question in seen:
            continue
        seen.add(question)
        split = "train" if len(tasks) < n_train else "heldout"
        index = len(tasks) if split == "train" else len(tasks) - n_train
        answer = (DAYS.index(day) + sign * n) % 7
        tasks.append(Task(f"cal-{split}-{seed}-{index}", question, f"{day} {'+' if sign > 0 else '-'} {n}", answer))
    return tasks[:n_train], tasks[n_train:]


_COUNT = re.compile(r"(" + "|".join(DAYS) + r")\s*([-+])\s*(\d+)", re.IGNORECASE)


def count_days(text: str) -> tuple[str, int] | None:
    """The tool: the first "Day +/- N" in the text, and the weekday index it lands on."""
    match = _COUNT.search(text)
    if match is None:
        return None
    day = match.group(1).capitalize()
    offset = int(match.group(3)) * (1 if match.group(2) == "+" else -1)
    return f"{day} {match.group(2)} {match.group(3)}", (DAYS.index(day) + offset) % 7


def final_day(text: str) -> int | None:
    """The weekday after 'Answer:', else the last weekday named in the text."""
    after = text.split("Answer:")[-1] if "Answer:" in text else text
    named = [(m.start(), DAYS.index(m.group(0).capitalize()))
             for m in re.finditer("|".join(DAYS), after, re.IGNORECASE)]
    return named[-1][1] if named else None


def grade(task: Task, reply: str, parsed: str | None) -> tuple[float, dict[str, float]]:
    correct = final_day(reply) == task.answer
    counted = count_days(parsed or "")
    return float(correct), {"answer_correct": float(correct),
                            "count_correct": float(counted is not None and counted[1] == task.answer)}


class CalendarWorkflow:
    """Parser -> day-counting tool -> replier, graded on the final weekday."""

    AGENTS = ("parser", "replier")

    def __init__(self, proxy_url: str, model: str, temperature: float = 0.7, post_rewards: bool = True):
        self.agents = AgentClients(proxy_url, model, temperature, self.AGENTS, "calendar", post_rewards)

    async def run(self, task: Task, evaluation: bool = False, grouped: bool = True) -> tuple[float, dict]:
        ids = await self.agents.open(task, evaluation, grouped)
        messages = [{"role": "system", "content": PARSER_SYSTEM}]
        for question, parsed in PARSER_SHOTS:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": parsed}]
        parsed = await self.agents.ask("parser", messages + [{"role": "user", "content": task.question}], ids, 12)
        counted = count_days(parsed)
        count = f"{counted[0]} = {DAYS[counted[1]]}" if counted else "(no count)"
        reply = await self.agents.ask("replier", [
            {"role": "system", "content": REPLIER_SYSTEM},
            {"role": "user", "content": REPLIER_SHOT[0]}, {"role": "assistant", "content": REPLIER_SHOT[1]},
            {"role": "user", "content": f"Question: {task.question}\nCount: {count}"},
        ], ids, 24)
        reward, dims = grade(task, reply, parsed)
        await self.agents.report(ids, reward, dims, evaluation)
        return reward, dims

    async def close(self) -> None:
        await self.agents.close()
