"""The example multi-agent workflows' plumbing, and the arithmetic workflow of `make demo`.

Every agent is a plain OpenAI SDK client pointed at Flywheel, its name in the base_url; the
episode and task ids go in headers. Each episode is opened with its task id when attempts
of one task should form a GRPO group (without one it is a one-off, as most production
traffic is); evaluation episodes are marked `{"eval": true}`, which keeps them away from
the learner. The arithmetic workflow: a planner writes the calculation, a tool computes
it, a writer answers the user.
"""

from __future__ import annotations

import os

import httpx
import openai

from examples.arithmetic import Task, calculate, grade

PLANNER_SYSTEM = "Turn the word problem into one arithmetic expression. Reply with only the expression."
PLANNER_SHOTS = (
    ("Ben has 4 cups and gets 9 more. How many cups does Ben have now?", "4 + 9"),
    ("Zoe has 15 hats and gives away 6. How many hats does Zoe have now?", "15 - 6"),
    ("Kim has 3 boxes with 5 pens in each box. How many pens does Kim have?", "3 * 5"),
)
WRITER_SYSTEM = "Answer the question in one short sentence using the calculation, then a last line: Answer: <number>"
WRITER_SHOT = ("Question: Ben has 4 cups and gets 9 more. How many cups does Ben have now?\nCalculation: 4 + 9 = 13",
               "Ben has 13 cups now.\nAnswer: 13")


class AgentClients:
    """One OpenAI client per agent, all pointed at Flywheel, and the episode API beside them."""

    def __init__(self, proxy_url: str, model: str, temperature: float, agents: tuple[str, ...], example: str,
                 post_rewards: bool = True):
        self.proxy_url = proxy_url.rstrip("/")
        self.post_rewards = post_rewards  # False: train episodes are only closed, for a [grader] to score
        self.model = model
        self.temperature = temperature
        self.example = example
        self.clients = {name: openai.AsyncOpenAI(base_url=f"{self.proxy_url}/agents/{name}/v1", api_key=os.environ.get("FLYWHEEL_API_KEY", "unused"))
                        for name in agents}
        self.http = httpx.AsyncClient(base_url=self.proxy_url, timeout=60)

    async def open(self, task: Task, evaluation: bool, grouped: bool) -> dict[str, str]:
        """A new episode; the headers that attribute a call to it (and to its task, when `grouped`)."""
        body = {"metadata": {"eval": evaluation, "example": self.example}}
        if grouped:
            body["task"] = task.task_id
        reply = await self.http.post("/v1/episodes", json=body)
        reply.raise_for_status()
        ids = {"X-Flywheel-Episode": reply.json()["episode_id"]}
        if grouped:
            ids["X-Flywheel-Task"] = task.task_id
        return ids

    async def ask(self, agent: str, messages: list[dict], ids: dict[str, str], max_tokens: int) -> str:
        reply = await self.clients[agent].chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=self.temperature,
            extra_headers=ids)
        return reply.choices[0].message.content or ""

    async def report(self, ids: dict[str, str], reward: float, dims: dict[str, float], evaluation: bool) -> None:
        """The graded outcome (always for evaluation episodes: held-out scores come from it),
        then the close: the episode is ready for the learner."""
        episode_id = ids["X-Flywheel-Episode"]
        if self.post_rewards or evaluation:
            feedback = await self.http.post(f"/v1/episodes/{episode_id}/feedback", json={
                "reward": reward, "dims": dims, "source": "grader", "idempotency_key": f"{episode_id}-grade"})
            feedback.raise_for_status()
        (await self.http.post(f"/v1/episodes/{episode_id}/close", json={})).raise_for_status()

    async def close(self) -> None:
        await self.http.aclose()
        for client in self.clients.values():
            await client.close()


class Workflow:
    """The arithmetic workflow: planner -> calculator tool -> writer, graded on the final number."""

    AGENTS = ("planner", "writer")

    def __init__(self, proxy_url: str, model: str, temperature: float = 0.7, post_rewards: bool = True):
        self.agents = AgentClients(proxy_url, model, temperature, self.AGENTS, "arithmetic", post_rewards)

    async def run(self, task: Task, evaluation: bool = False, grouped: bool = True) -> tuple[float, dict]:
        """One episode: plan, calculate, write, grade, report the outcome to Flywheel."""
        ids = await self.agents.open(task, evaluation, grouped)
        messages = [{"role": "system", "content": PLANNER_SYSTEM}]
        for question, expression in PLANNER_SHOTS:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": expression}]
        plan = await self.agents.ask("planner", messages + [{"role": "user", "content": task.question}], ids, 16)
        calc = calculate(plan)
        calculation = f"{calc[0]} = {calc[1]}" if calc else "(no calculation)"
        reply = await self.agents.ask("writer", [
            {"role": "system", "content": WRITER_SYSTEM},
            {"role": "user", "content": WRITER_SHOT[0]}, {"role": "assistant", "content": WRITER_SHOT[1]},
            {"role": "user", "content": f"Question: {task.question}\nCalculation: {calculation}"},
        ], ids, 32)
        reward, dims = grade(task, reply, plan)
        await self.agents.report(ids, reward, dims, evaluation)
        return reward, dims

    async def close(self) -> None:
        await self.agents.close()
