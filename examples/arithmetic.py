"""The example's task set and grader: short word problems, answered by a two-agent workflow.

Each task is a one-step word problem (addition, subtraction or multiplication) with a
known integer answer, generated from a seed so the train and held-out splits are fixed
and disjoint. The grader checks substance: the final answer must be the right number;
format alone earns nothing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Ivy", "Noah", "Zara", "Ben", "Eva", "Raj")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles", "cookies", "stickers")


@dataclass(frozen=True)
class Task:
    task_id: str
    question: str
    expression: str  # the one-step calculation that answers it
    answer: int


def make_task(rng: random.Random, task_id: str) -> Task:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return Task(task_id, f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                    f"{a} + {b}", a + b)
    if kind == "sub":
        a, b = rng.randint(12, 60), rng.randint(2, 11)
        return Task(task_id, f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?",
                    f"{a} - {b}", a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return Task(task_id, f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
                f"{a} * {b}", a * b)


def task_split(seed: int, n_train: int, n_heldout: int) -> tuple[list[Task], list[Task]]:
    """Disjoint train and held-out tasks (no question appears in both), fixed by `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    tasks: list[Task] = []
    while len(tasks) < n_train + n_heldout:
        split = "train" if len(tasks) < n_train else "heldout"
        task = make_task(rng, f"{split}-{seed}-{len(tasks) if split == 'train' else len(tasks) - n_train}")
        if task.question not in seen:
            seen.add(task.question)
            tasks.append(task)
    return tasks[:n_train], tasks[n_train:]


_EXPRESSION = re.compile(r"(-?\d+)\s*([-+*x×])\s*(-?\d+)")


def calculate(text: str) -> tuple[str, int] | None:
    """The calculator tool: the first `a op b` in the text and its value, or None."""
    match = _EXPRESSION.search(text)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    op = "*" if op in "x×" else op
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b}", value


def final_answer(text: str) -> int | None:
    """The number after 'Answer:', else the last number in the text."""
    match = re.search(r"Answer:\s*(-?\d+)", text)
    if match:
        return int(match.group(1))
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def grade(task: Task, reply: str, expression: str | None) -> tuple[float, dict[str, float]]:
    """Reward 1 for the right final number, else 0; dims say which step went wrong."""
    correct = final_answer(reply) == task.answer
    calc = calculate(expression or "")
    return float(correct), {
        "answer_correct": float(correct),
        "expression_correct": float(calc is not None and calc[1] == task.answer),
        "has_answer_line": float("Answer:" in reply),
    }
