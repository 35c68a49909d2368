"""The example multi-agent workflow: a planner writes the calculation, a tool computes it,
a writer answers the user. Both agents are plain OpenAI SDK clients pointed at Flywheel;
the agent name is in the base_url, the episode and task ids in headers. Each episode is
opened with its task id (attempts of one task form a GRPO group); evaluation episodes are
marked `{"eval": true}`, which keeps them away from the learner.
"""

from __future__ import annotations

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


class Workflow:
    """One client per agent; each episode passes its ids per call."""

    def __init__(self, proxy_url: str, model: str, temperature: float = 0.7):
        self.proxy_url = proxy_url.rstrip("/")
        self.model = model
        self.temperature = temperature
        self.planner = openai.AsyncOpenAI(base_url=f"{self.proxy_url}/agents/planner/v1", api_key="unused")
        self.writer = openai.AsyncOpenAI(base_url=f"{self.proxy_url}/agents/writer/v1", api_key="unused")
        self.http = httpx.AsyncClient(base_url=self.proxy_url, timeout=60)

    async def _ask(self, client: openai.AsyncOpenAI, messages: list[dict], ids: dict, max_tokens: int,
                   temperature: float) -> str:
        reply = await client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, extra_headers=ids)
        return reply.choices[0].message.content or ""

    async def open_episode(self, task: Task, evaluation: bool) -> str:
        reply = await self.http.post("/v1/episodes", json={
            "task": task.task_id, "metadata": {"eval": evaluation, "example": "arithmetic"}})
        reply.raise_for_status()
        return reply.json()["episode_id"]

    async def run(self, task: Task, evaluation: bool = False) -> tuple[float, dict]:
        """One episode: plan, calculate, write, grade, report the outcome to Flywheel."""
        episode_id = await self.open_episode(task, evaluation)
        ids = {"X-Flywheel-Episode": episode_id, "X-Flywheel-Task": task.task_id}
        messages = [{"role": "system", "content": PLANNER_SYSTEM}]
        for question, expression in PLANNER_SHOTS:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": expression}]
        plan = await self._ask(self.planner, messages + [{"role": "user", "content": task.question}], ids, 16,
                               self.temperature)
        calc = calculate(plan)
        calculation = f"{calc[0]} = {calc[1]}" if calc else "(no calculation)"
        reply = await self._ask(self.writer, [
            {"role": "system", "content": WRITER_SYSTEM},
            {"role": "user", "content": WRITER_SHOT[0]}, {"role": "assistant", "content": WRITER_SHOT[1]},
            {"role": "user", "content": f"Question: {task.question}\nCalculation: {calculation}"},
        ], ids, 32, self.temperature)
        reward, dims = grade(task, reply, plan)
        feedback = await self.http.post(f"/v1/episodes/{episode_id}/feedback", json={
            "reward": reward, "dims": dims, "source": "grader", "idempotency_key": f"{episode_id}-grade"})
        feedback.raise_for_status()
        (await self.http.post(f"/v1/episodes/{episode_id}/close")).raise_for_status()
        return reward, dims

    async def close(self) -> None:
        await self.http.aclose()
        await self.planner.close()
        await self.writer.close()
