"""The grader contract: closed episodes scored by a grading service (a test server here), in
task groups, retried, failures recorded and never turned into 0, re-grading under a new version."""

import asyncio
import json

import aiohttp
import openai
import pytest

from flywheel.commands import main
from flywheel.proxy.agreement import agreement, ranks, spearman, wilson
from flywheel.proxy.grader import GradeError, GraderConfig, mixed_reward, parse_scores, task_groups
from flywheel.proxy.judge import DEFAULT_RUBRIC, chunks, judge_messages, parse_judgement, render_episode
from tests.conftest import Running, eventually
from tests.fake_upstream import NO_RESPONSE_FORMAT, REPLIES
from tests.test_feedback import api


def test_episodes_of_a_task_go_together_and_lone_ones_alone():
    episodes = [{"episode_id": e, "task_id": t} for e, t in (("a", "t1"), ("b", None), ("c", "t1"), ("d", None))]
    assert [[e["episode_id"] for e in g] for g in task_groups(episodes)] == [["a", "c"], ["b"], ["d"]]


@pytest.mark.parametrize("reply, problem", [
    ({"scores": [1.0]}, "1 scores for 2 items"), ({"scores": [1.0, float("nan")]}, "not a finite number"),
    ({"scores": [1.0, "high"]}, "not a finite number"), ({"scores": [True, 0]}, "not a finite number"),
    ({"score": [1, 0]}, "no 'scores' list"), ([1, 0], "no 'scores' list"),
])
def test_a_reply_that_cannot_be_used_is_an_error_never_a_zero(reply, problem):
    with pytest.raises(GradeError, match=problem):
        parse_scores(reply, 2)
    assert parse_scores({"scores": [1, 0.5]}, 2) == [1.0, 0.5]


def test_posted_feedback_and_the_grade_mix_by_weight():
    assert mixed_reward(0.0, None, 0.25) == 0.0
    assert mixed_reward(0.0, 1.0, 0.25) == 0.25


def _grader(service, **overrides) -> GraderConfig:
    return GraderConfig(**{"kind": "endpoint", "url": service.url, "name": "rules", "version": "1", "wait_s": 0,
                           "poll_s": 0.05, "backoff_s": 0.01, "rubric": "right answers", **overrides})


async def _episode(proxy, task: str | None, max_tokens: int, reward: float | None = None) -> str:
    status, created = await api(proxy, "POST", "/v1/episodes", {"task": task} if task else {})
    episode = created["episode_id"]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q {episode}"}],
                                         max_tokens=max_tokens, extra_headers={"X-Flywheel-Episode": episode})
    if reward is not None:
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": reward})
    await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    return episode


async def _graded(proxy, count: int) -> list[dict]:
    sql = "SELECT * FROM feedback WHERE grader_version IS NOT NULL ORDER BY created_at"
    await eventually(lambda: _count(proxy, sql, count), 10, f"{count} grades")
    return await proxy.rows(sql)


async def _count(proxy, sql, count) -> bool:
    return len(await proxy.rows(sql)) >= count


async def test_closed_unrewarded_episodes_are_graded_in_task_groups(start_proxy, service):
    proxy = await start_proxy(grader=_grader(service, poll_s=3600))  # one pass, run by the test
    first = await _episode(proxy, "t1", 3)
    lone = await _episode(proxy, None, 5)
    second = await _episode(proxy, "t1", 7)
    await _episode(proxy, "t1", 2, reward=1.0)  # a client rewarded it: not the grader's (apply_to = unrewarded)
    await proxy.state.writer.flush()
    assert await proxy.state.grader.grade_due("1") == 3
    grades = await _graded(proxy, 3)
    by_task = [tuple(i["episode_id"] for i in r["items"]) for r in service.requests]
    assert by_task == [(first, second), (lone,)]
    request = next(r for r in service.requests if r["items"][0]["episode_id"] == first)
    assert request["rubric"] == "right answers"
    item = request["items"][0]
    assert (item["id"], item["task"], item["target_call"]) == (first, "t1", None)
    [call] = item["calls"]
    assert call["agent"] == "solver" and call["messages"] == [{"role": "user", "content": f"q {first}"}]
    assert call["completion"]["content"] == " w0 w1 w2"
    assert {(g["episode_id"], g["reward"], g["source"], g["grader_version"]) for g in grades} == {
        (first, 0.9, "endpoint:rules", "1"), (lone, 1.5, "endpoint:rules", "1"),
        (second, 2.1, "endpoint:rules", "1")}
    rewards = {r["episode_id"]: r["reward"] for r in await proxy.rows("SELECT episode_id, reward FROM episodes")}
    assert rewards[first] == 0.9 and rewards[second] == pytest.approx(2.1)
    assert await proxy.state.grader.grade_due("1") == 0  # graded once


async def test_a_failing_service_is_retried_then_the_failure_is_recorded_not_a_zero(start_proxy, service):
    service.failures = [503, {"scores": []}]  # down, then the wrong count: the third try answers
    proxy = await start_proxy(grader=_grader(service, attempts=3))
    episode = await _episode(proxy, None, 3)
    [grade] = await _graded(proxy, 1)
    assert grade["episode_id"] == episode and len(service.requests) == 3

    service.failures = [500] * 3
    failed = await _episode(proxy, None, 4)
    await eventually(lambda: _count(proxy, "SELECT 1 FROM episodes WHERE grade_failed_at IS NOT NULL", 1), 10,
                     "a recorded failure")
    [row] = await proxy.rows(f"SELECT reward, grade_error FROM episodes WHERE episode_id = '{failed}'")
    assert row["reward"] is None and "answered 500" in row["grade_error"] and "after 3 attempt(s)" in row["grade_error"]
    await asyncio.sleep(0.3)
    assert len(service.requests) == 6  # given up on: not retried by the background pass
    status, shown = await api(proxy, "GET", "/v1/grader")
    assert status == 200 and shown["failed"] == 1 and shown["grade_failed"][0]["episode_id"] == failed

    # `flywheel grade` under a new version: both episodes scored again, the failed one too
    code = await asyncio.to_thread(main, ["grade", "--url", proxy.url, "--grader-version", "2"])
    assert code == 0
    regraded = await proxy.rows("SELECT episode_id, reward FROM feedback WHERE grader_version = '2'")
    assert {r["episode_id"] for r in regraded} == {episode, failed}
    [row] = await proxy.rows(f"SELECT reward, grade_failed_at FROM episodes WHERE episode_id = '{failed}'")
    assert row["reward"] == pytest.approx(1.2) and row["grade_failed_at"] is None


async def test_grading_every_episode_mixes_in_posted_feedback_and_holds_the_learner_back(start_proxy, service):
    proxy = await start_proxy(grader=_grader(service, apply_to="all", feedback_weight=0.25, poll_s=3600))
    store = proxy.state.writer.store
    episode = await _episode(proxy, None, 3, reward=1.0)
    await proxy.state.writer.flush()
    held = ("endpoint:rules", "1", True)
    assert store.episodes_to_push(10, 0.0, held) == []  # rewarded and closed, but not graded yet
    assert [e["episode_id"] for e in store.episodes_to_push(10, 0.0)] == [episode]
    assert await proxy.state.grader.grade_due("1") == 1
    [grade] = await _graded(proxy, 1)
    assert grade["reward"] == pytest.approx(0.25 * 1.0 + 0.75 * 0.9)  # " w0 w1 w2": 9 characters
    assert grade["dims"] == {"grade": 0.9, "feedback": 1.0}
    assert [e["episode_id"] for e in store.episodes_to_push(10, 0.0, held)] == [episode]


async def test_the_example_grading_service_scores_an_episode_by_the_examples_rules():
    from examples import arithmetic
    from examples.grader_service import make_app

    [task], _ = arithmetic.task_split(0, 1, 0)
    app = await Running(make_app("arithmetic", 0, 1, 0)).start()

    def item(expression: str, reply: str, question: str = task.question) -> dict:
        return {"id": "e", "episode_id": "e", "task": None, "metadata": {}, "target_call": None, "calls": [
            {"call_id": "c1", "agent": "planner", "messages": [{"role": "system", "content": "..."},
                                                               {"role": "user", "content": question}],
             "completion": {"role": "assistant", "content": expression}},
            {"call_id": "c2", "agent": "writer", "messages": [], "completion": {"role": "assistant",
                                                                                "content": reply}}]}

    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{app.url}/grade", json={"rubric": None, "items": [
                    item(task.expression, f"So.\nAnswer: {task.answer}"), item(task.expression, "Answer: -1"),
                    item(task.expression, f"Answer: {task.answer}", question="an unknown question")]}) as r:
                assert (await r.json()) == {"scores": [1.0, 0.0, 0.0]}
            planner_only = [dict(item(e, "unused"), calls=item(e, "unused")["calls"][:1], target_call="c1")
                            for e in (task.expression, "1 + 1")]  # a comparison group of the planner's call
            async with session.post(f"{app.url}/grade", json={"rubric": None, "items": planner_only}) as r:
                assert (await r.json()) == {"scores": [1.0, float(task.answer == 2)]}
    finally:
        await app.stop()


def _items(*ids: str) -> list[dict]:
    return [{"id": i, "episode_id": i, "task": "t", "metadata": {}, "target_call": None, "calls": [
        {"call_id": f"{i}-c", "agent": "solver", "messages": [{"role": "user", "content": "2 + 2?"}],
         "completion": {"role": "assistant", "content": f"answer of {i}"}}]} for i in ids]


def test_the_judge_reads_its_json_by_id_or_in_order_or_by_its_score_fields():
    ids = ["a", "b"]
    assert parse_judgement('{"scores": [{"id": "b", "reason": ".", "score": 0.2}, '
                           '{"id": "a", "reason": ".", "score": 0.9}]}', ids) == [0.9, 0.2]
    assert parse_judgement('Sure! {"scores": [{"id": "1", "score": 1.5}, {"id": "2", "score": -1}]} done', ids) == [
        1.0, 0.0]  # ids it invented: by position; clipped to [0, 1]
    assert parse_judgement('a: "score": 0.25, b: "score": 0.75 (cut off', ids) == [0.25, 0.75]
    with pytest.raises(GradeError, match="scored 1 of 2"):
        parse_judgement('{"scores": [{"id": "a", "score": 1}]}', ids)
    with pytest.raises(GradeError, match="scored 0 of 2"):
        parse_judgement("I cannot grade these.", ids)


def test_a_large_group_is_split_by_episodes_and_by_characters():
    items = _items("a", "b", "c", "d", "e")
    assert [[i["id"] for i in piece] for piece in chunks(items, 2, 10_000)] == [["a", "b"], ["c", "d"], ["e"]]
    one = len(render_episode(items[0]))
    assert [len(piece) for piece in chunks(items, 8, 2 * one + 1)] == [2, 2, 1]
    messages = judge_messages(None, items[:2])
    assert "Episode a" in messages[1]["content"] and "answer of b" in messages[1]["content"]
    assert DEFAULT_RUBRIC in messages[0]["content"]


async def test_the_judge_scores_a_task_group_and_its_calls_are_recorded_never_trained(start_proxy, upstream):
    judge = GraderConfig(kind="judge", wait_s=0, poll_s=3600, judge_max_items=2, backoff_s=0.01)
    proxy = await start_proxy(grader=judge, base_model="m")
    episodes = [await _episode(proxy, "t1", 3) for _ in range(3)]
    await proxy.state.writer.flush()
    upstream.app[REPLIES][:] = [
        json.dumps({"scores": [{"id": episodes[0], "reason": "right", "score": 0.9},
                               {"id": episodes[1], "reason": "wrong", "score": 0.1}]}),
        'The third: "score": 0.5']  # no JSON: read by the tolerant parser
    assert await proxy.state.grader.grade_due("1") == 3
    grades = await _graded(proxy, 3)
    assert [(g["episode_id"], g["reward"], g["source"]) for g in grades] == [
        (episodes[0], 0.9, "judge:m"), (episodes[1], 0.1, "judge:m"), (episodes[2], 0.5, "judge:m")]
    asked = [body for body in upstream.received if body.get("response_format")]
    assert len(asked) == 2 and asked[0]["response_format"]["json_schema"]["name"] == "judgement"
    assert asked[0]["model"] == "m" and asked[0]["temperature"] == 0.0
    judged = await proxy.rows("SELECT c.agent, c.completion_token_ids, e.metadata, e.reward FROM calls c "
                              "JOIN episodes e USING (episode_id) WHERE c.agent = 'flywheel-judge'")
    assert len(judged) == 2 and all(r["completion_token_ids"] and r["reward"] is None for r in judged)
    assert judged[0]["metadata"]["judged"] in (episodes[:2], episodes[2:])
    pushed = proxy.state.writer.store.episodes_to_push(100, 0.0)
    assert {e["agent"] for e in pushed} == {None}  # the graded episodes go to the learner, the judge's never


async def test_an_endpoint_without_response_format_gets_plain_text(start_proxy, upstream):
    proxy = await start_proxy(grader=GraderConfig(kind="judge", judge_model="m", wait_s=0, poll_s=3600))
    episode = await _episode(proxy, None, 3)
    await proxy.state.writer.flush()
    upstream.app[NO_RESPONSE_FORMAT][0] = True
    upstream.app[REPLIES][:] = [json.dumps({"scores": [{"id": episode, "reason": "ok", "score": 0.7}]})]
    assert await proxy.state.grader.grade_due("1") == 1
    [grade] = await _graded(proxy, 1)
    assert grade["reward"] == 0.7 and "response_format" not in upstream.received[-1]


def test_ranks_and_agreement_by_hand():
    assert ranks([0.5, 0.1, 0.5, 0.9]) == [2.5, 1.0, 2.5, 4.0]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    # group 1: perfect order; group 2: reversed; group 3: one tie in scores among 3 labelled pairs
    found = agreement([[(0.9, 1), (0.1, 0)], [(0.2, 1), (0.8, 0)], [(0.5, 1), (0.5, 0), (0.1, 0)]])
    assert found.groups == 3 and found.pairs == 1 + 1 + 2  # (1,0) pairs only: equal labels are not compared
    assert found.pair_accuracy == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    low, high = found.pair_ci95
    assert low < found.pair_accuracy < high and (low, high) == pytest.approx(wilson(2.5, 4))
    rho3 = spearman([0.5, 0.5, 0.1], [1, 0, 0])
    assert found.spearman == pytest.approx((1 - 1 + rho3) / 3)


async def test_calibration_scores_labelled_episodes_without_recording(start_proxy, service, tmp_path, capsys):
    proxy = await start_proxy(grader=_grader(service, poll_s=3600))
    short, long, other = (await _episode(proxy, "t1", 2), await _episode(proxy, "t1", 6),
                          await _episode(proxy, "t2", 4))
    other_long = await _episode(proxy, "t2", 8)
    labels = tmp_path / "labels.jsonl"  # people preferred the longer answer in t1, the shorter in t2
    labels.write_text("\n".join(json.dumps(r) for r in [
        {"episode_id": short, "label": 0}, {"episode_id": long, "label": 1},
        {"episode_id": other, "label": 1}, {"episode_id": other_long, "label": 0}]))
    code = await asyncio.to_thread(main, ["grade", "--url", proxy.url, "--calibrate", str(labels)])
    assert code == 0  # scored by length: right on t1's pair, wrong on t2's
    assert json.loads(capsys.readouterr().out) == {
        "groups": 2, "spearman": pytest.approx(0.0), "spearman_ci95": pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5),
        "pairs": 2, "pair_accuracy": 0.5, "pair_ci95": pytest.approx(list(wilson(1, 2))),
        "unscored_episodes": 0, "last_error": ""}
    status, found = await api(proxy, "POST", "/v1/grader/calibrate", {"labels": [
        {"episode_id": short, "label": 0}, {"episode_id": long, "label": 1}]})
    assert status == 200 and found["pairs"] == 1 and found["pair_accuracy"] == 1.0
    assert found["spearman"] == pytest.approx(1.0)
    assert await proxy.rows("SELECT * FROM feedback") == []  # calibration records nothing
    service.failures = [500] * 4  # a group the grader cannot score is left out and counted
    status, found = await api(proxy, "POST", "/v1/grader/calibrate", {"labels": [
        {"episode_id": short, "label": 0}, {"episode_id": long, "label": 1}]})
    assert status == 200 and found["unscored_episodes"] == 2 and found["pairs"] == 0 and "500" in found["last_error"]
