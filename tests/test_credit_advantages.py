"""Credit assignment and advantages, against hand-computed expectations."""

import math

import pytest

from flywheel.learner.advantages import (AdvantageConfig, Baseline, TaskReturns, centred_on_group,
                                         compute_advantages, std)
from flywheel.learner.credit import CreditConfig, agent_filter, assign, call_credits, scalar_reward
from flywheel.protos import flywheel_pb2 as pb


def call(call_id, agent, seq, n_tokens=3, finish="stop", status=200, rewards=(), adapter="base", choices=1):
    return pb.Call(call_id=call_id, agent=agent, seq=seq, adapter=adapter, prompt_token_ids=[1, 2],
                   completion_token_ids=list(range(10, 10 + n_tokens)), completion_logprobs=[-0.5] * n_tokens,
                   finish_reason=finish, status=status, temperature=0.7, choices=choices,
                   rewards=[pb.Reward(reward=r) for r in rewards])


def episode(episode_id, task, reward, calls, dims=None):
    rewards = [pb.Reward(reward=-9)] + ([pb.Reward(reward=reward, dims=dims or {})] if reward is not None else [])
    return pb.Episode(episode_id=episode_id, task_id=task, calls=calls, rewards=rewards)


def test_identical_credit_gives_every_trained_call_the_latest_episode_reward():
    ep = episode("e", "t", 1.0, [call("a", "planner", 0), call("b", "writer", 1), call("c", "critic", 2)])
    transitions, skipped = assign(ep, CreditConfig(), agent_filter("planner|writer"))
    assert [(t.agent, t.reward) for t in transitions] == [("planner", 1.0), ("writer", 1.0)]
    assert transitions[0].temperature == 0.7 and transitions[0].completion_ids == (10, 11, 12)
    assert not skipped


def test_discounted_credit_decays_per_step_back_from_the_end():
    ep = episode("e", "t", 2.0, [call("a", "x", 0), call("b", "x", 1), call("c", "x", 2)])
    assert call_credits(ep, CreditConfig(mode="discounted", gamma=0.5)) == {"a": 0.5, "b": 1.0, "c": 2.0}


def test_call_feedback_adds_or_overrides():
    ep = episode("e", "t", 1.0, [call("a", "x", 0, rewards=(0.25, -0.5)), call("b", "x", 1)])
    assert call_credits(ep, CreditConfig(call_feedback="add")) == {"a": 0.5, "b": 1.0}
    assert call_credits(ep, CreditConfig(call_feedback="override")) == {"a": -0.5, "b": 1.0}


def test_dims_combined_with_weights():
    reward = pb.Reward(reward=1.0, dims={"correct": 1.0, "style": 0.5})
    assert scalar_reward(reward, None) == 1.0
    assert scalar_reward(reward, {"correct": 0.8, "style": 0.4}) == pytest.approx(1.0)
    assert scalar_reward(reward, {"reward": 0.5, "missing": 3.0}) == 0.5
    ep = episode("e", "t", 0.0, [call("a", "x", 0)], dims={"correct": 1.0})
    assert call_credits(ep, CreditConfig(dim_weights={"correct": 2.0})) == {"a": 2.0}


def test_untrainable_calls_are_skipped_with_a_reason():
    no_ids = pb.Call(call_id="n", agent="x", seq=3, status=200, finish_reason="stop")
    ep = episode("e", "t", 1.0, [call("a", "x", 0, finish="length"), call("b", "x", 1, status=502),
                                 call("c", "x", 2, n_tokens=40), no_ids, call("d", "x", 4, choices=2)])
    transitions, skipped = assign(ep, CreditConfig(skip_truncated=True, max_tokens=30), agent_filter(".*"))
    assert transitions == []
    assert skipped == {"truncated": 1, "error_status": 1, "too_long": 1, "no_token_ids": 1, "several_choices": 1}
    kept, _ = assign(ep, CreditConfig(skip_truncated=False, max_tokens=30), agent_filter(".*"))
    assert [t.seq for t in kept] == [0]


def _members(rewards):
    """One single-call episode per reward, as a group's members."""
    return [[t] for t in _episodes([(f"e{i}", "t", r, 1) for i, r in enumerate(rewards)])]


def test_group_advantage_formula():
    # rewards 1, 0, 0, 1: mean 0.5, sample std sqrt(1/3)
    got = centred_on_group(_members([1.0, 0.0, 0.0, 1.0]), AdvantageConfig())
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert got == pytest.approx([expected, -expected, -expected, expected])
    assert centred_on_group(_members([3.0, 1.0]), AdvantageConfig(scale="none")) == [1.0, -1.0]
    assert std([1.0]) == 0.0


def test_a_rolling_group_includes_the_tasks_values_already_trained_on():
    # new rewards 1, 0 with prior 0, 0: V = [0, 0, 1, 0], mean 0.25, std 0.5
    got = centred_on_group(_members([1.0, 0.0]), AdvantageConfig(), prior_V=[0.0, 0.0])
    assert got == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001])


def test_rolling_groups_train_each_attempt_once_against_the_tasks_latest_returns():
    """Trickle traffic: two attempts of task t per update. Each update trains its new attempts,
    scored among the task's latest `window` returns, and remembers them."""
    returns = TaskReturns(window=4)
    first, stats = compute_advantages(_transitions({"t": [1, 1]}), AdvantageConfig(scale="none"), {}, returns)
    assert first == [] and stats.skipped == {"zero_variance_group": 2}  # equal rewards: nothing to learn yet...
    assert returns.values == {"x\tt": [1.0, 1.0]}  # ...but remembered
    second, stats = compute_advantages(_transitions({"t": [0, 0]}), AdvantageConfig(scale="none"), {}, returns)
    # V = [1, 1, 0, 0]: mean 0.5; equal among themselves, the new attempts still learn from the old
    assert [s.advantage for s in second] == [-0.5, -0.5] and stats.groups == 1
    third, _ = compute_advantages(_transitions({"t": [1, 0, 1]}), AdvantageConfig(scale="none"), {}, returns)
    # three new values keep one prior (the latest 0): V = [0, 1, 0, 1], mean 0.5
    assert [s.advantage for s in third] == [0.5, -0.5, 0.5]
    assert returns.values == {"x\tt": [0.0, 1.0, 0.0, 1.0]} and returns.attempts() == {"t": 4}


def test_one_attempt_joins_its_tasks_rolling_group_and_the_memory_is_bounded():
    returns = TaskReturns(window=8, limit=2, values={"x\tt": [0.0, 1.0]})
    scored, stats = compute_advantages(_transitions({"t": [1]}), AdvantageConfig(scale="none"), {}, returns)
    assert [round(s.advantage, 6) for s in scored] == [round(1 - 2 / 3, 6)] and stats.groups == 1
    lone, stats = compute_advantages(_transitions({"u": [1]}), AdvantageConfig(), {}, returns)
    assert lone == [] and stats.skipped == {"no_baseline_yet": 1}  # first attempt of u: a singleton
    compute_advantages(_transitions({"v": [0]}), AdvantageConfig(), {}, returns)
    assert list(returns.values) == ["x\tu", "x\tv"]  # t, least recently trained, is forgotten


def _transitions(rewards_by_task, agent="x"):
    eps = [episode(f"{task}-{i}", task, r, [call(f"{task}-{i}", agent, 0)])
           for task, rewards in rewards_by_task.items() for i, r in enumerate(rewards)]
    return [t for ep in eps for t in assign(ep, CreditConfig(), agent_filter(".*"))[0]]


def test_zero_variance_groups_are_dropped_and_groups_are_per_task():
    scored, stats = compute_advantages(_transitions({"t1": [1, 1, 1], "t2": [1, 0]}), AdvantageConfig(), {})
    assert [s.transition.task_id for s in scored] == ["t2", "t2"]
    assert stats.skipped == {"zero_variance_group": 3} and stats.groups == 1
    assert scored[0].advantage == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))


def test_batch_scale_divides_by_the_batch_reward_std():
    scored, _ = compute_advantages(_transitions({"t1": [1, 0], "t2": [3, 1]}), AdvantageConfig(scale="batch"), {})
    spread = std([1, 0, 3, 1])
    assert [s.advantage for s in scored] == pytest.approx([a / (spread + 1e-4) for a in (0.5, -0.5, 1, -1)])


def _episodes(specs, agent="x"):
    """[(episode id, task, reward, calls of the agent)] -> transitions, in that order."""
    eps = [episode(e, task, r, [call(f"{e}-{k}", agent, k) for k in range(n)]) for e, task, r, n in specs]
    return [t for ep in eps for t in assign(ep, CreditConfig(), agent_filter(".*"))[0]]


def test_a_singleton_baseline_is_bounded_and_scores_each_episode_before_learning_from_it():
    """Rewards 0 then 1 gave A = 1 / (0 + 1e-4) = 10000: now the std is floored at 0.25."""
    baselines: dict[str, Baseline] = {}
    singles = _episodes([("e0", "", 0.0, 1), ("e1", "", 1.0, 1), ("e2", "", 0.0, 1)])
    scored, stats = compute_advantages(singles, AdvantageConfig(baseline_warmup=1), baselines)
    # e0 starts the baseline (mean 0, var 0); e1: (1 - 0) / max(0, 0.25) = 4;
    # then mean 0 + 0.1 * 1 = 0.1, var 0.9 * (0 + 0.1 * 1) = 0.09; e2: (0 - 0.1) / max(0.3, 0.25)
    assert [(s.transition.episode_id, s.advantage) for s in scored] == [("e1", 4.0), ("e2", pytest.approx(-1 / 3))]
    assert stats.skipped == {"no_baseline_yet": 1}
    assert baselines["x"].seen == 3 and baselines["x"].mean == pytest.approx(0.09)  # 0.1 + 0.1 * (0 - 0.1)


def test_the_calls_of_one_episode_share_the_baseline_from_before_it_which_learns_once():
    """Four calls of one episode got 2.0, 1.60, 1.36, 1.18 when the baseline learnt after every call."""
    baselines = {"x": Baseline(mean=0.0, var=0.0, seen=5)}
    scored, _ = compute_advantages(_episodes([("e", "", 2.0, 4)]), AdvantageConfig(scale="none"), baselines)
    assert [s.advantage for s in scored] == [2.0, 2.0, 2.0, 2.0]
    assert baselines["x"].seen == 6 and baselines["x"].mean == pytest.approx(0.2)


def test_singletons_wait_for_a_warm_baseline_and_groups_teach_it_too():
    baselines: dict[str, Baseline] = {}
    mixed = _episodes([("g0", "t", 1.0, 1), ("g1", "t", 0.0, 1), ("s0", "", 1.0, 1)])
    scored, stats = compute_advantages(mixed, AdvantageConfig(baseline_warmup=2, scale="none"), baselines)
    # the group's two episodes warm the baseline (mean 1 then 0.9); s0 is scored against 0.9
    assert [(s.transition.episode_id, round(s.advantage, 6)) for s in scored] == [
        ("g0", 0.5), ("g1", -0.5), ("s0", 0.1)]
    assert stats.groups == 1 and baselines["x"].seen == 3
    cold: dict[str, Baseline] = {}
    _, stats = compute_advantages(_episodes([("s1", "", 1.0, 2)]), AdvantageConfig(), cold)
    assert stats.skipped == {"no_baseline_yet": 2} and cold["x"].seen == 1


def test_group_statistics_per_episode_or_per_call():
    """e0 has three calls with reward 1, e1 one call with reward 0."""
    members = _episodes([("e0", "t", 1.0, 3), ("e1", "t", 0.0, 1)])
    by_episode, _ = compute_advantages(members, AdvantageConfig(), {})
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # returns [1, 0]: mean 0.5, std sqrt(0.5)
    assert [s.advantage for s in by_episode] == pytest.approx([a, a, a, -a])
    by_call, _ = compute_advantages(members, AdvantageConfig(level="call"), {})
    # rewards [1, 1, 1, 0]: mean 0.75, std 0.5
    assert [s.advantage for s in by_call] == pytest.approx([0.25 / 0.5001] * 3 + [-0.75 / 0.5001])


def test_staleness_drops_calls_served_by_versions_too_far_behind(tmp_path):
    from flywheel.learner.config import LearnerConfig
    from flywheel.learner.publish import Published
    from flywheel.learner.updates import Learner, served_version

    assert served_version("x-v3", "x") == 3 and served_version("smollm2", "x") == 0
    assert served_version("other-v9", "x") == 0  # another agent's adapter is not this agent's version
    learner = Learner(LearnerConfig(state_dir=str(tmp_path), max_staleness=4), model_dir="unused")
    learner.publisher.latest = {"x": Published(5, "x-v5", "/adapters/x-5")}
    calls = [call(f"c{i}", "x", 0, adapter=adapter) for i, adapter in enumerate(["x-v1", "x-v2", "x-v5", "base"])]
    learner.buffer.add([episode(f"e{i}", "t", float(i % 2), [c]) for i, c in enumerate(calls)])
    by_adapter, skipped = learner._transitions(learner.buffer.pending.values())
    assert [t.adapter for t in by_adapter["x"]] == ["x-v2", "x-v5"]  # 3 and 0 versions behind
    assert skipped == {"stale": 2}  # 4 and 5 behind


def _dim_episodes(rows, names=("correct", "style")):
    """[(episode id, reward, dims)] of task t, one call each, carrying the credit of `names`."""
    eps = [episode(e, "t", r, [call(f"{e}-c", "x", 0)], dims=d) for e, r, d in rows]
    return [t for ep in eps for t in assign(ep, CreditConfig(), agent_filter(".*"), names)[0]]


def test_gdpo_normalizes_each_dimension_within_its_group_before_weighing():
    """`style` spans 0..100, `correct` 0..1: summed raw, style would decide everything."""
    rows = [("a", 1.0, {"correct": 1.0, "style": 0.0}), ("b", 0.0, {"correct": 0.0, "style": 100.0}),
            ("c", 1.0, {"correct": 1.0, "style": 50.0})]
    transitions = _dim_episodes(rows)
    assert transitions[1].dims == {"correct": 0.0, "style": 100.0}
    config = AdvantageConfig(dim_weights={"correct": 1.0, "style": 0.5})
    scored, stats = compute_advantages(transitions, config, {})
    # correct: [1, 0, 1], mean 2/3, std sqrt(1/3); style: [0, 100, 50], mean 50, std 50
    z_correct = [(v - 2 / 3) / (math.sqrt(1 / 3) + 1e-4) for v in (1, 0, 1)]
    z_style = [(v - 50) / (50 + 1e-4) for v in (0, 100, 50)]
    assert [s.advantage for s in scored] == pytest.approx([c + 0.5 * y for c, y in zip(z_correct, z_style)])
    assert stats.groups == 1


def test_gdpo_a_constant_dimension_adds_nothing_and_rolling_groups_keep_each_dimensions_history():
    config = AdvantageConfig(dim_weights={"correct": 1.0, "style": 1.0}, scale="none")
    same = [("a", 1.0, {"correct": 1.0, "style": 3.0}), ("b", 1.0, {"correct": 1.0, "style": 3.0})]
    returns = TaskReturns(window=4)
    scored, stats = compute_advantages(_dim_episodes(same), config, {}, returns)
    assert scored == [] and stats.skipped == {"zero_variance_group": 2}
    assert returns.values["x\tt\tstyle"] == [3.0, 3.0] and returns.values["x\tt"] == [1.0, 1.0]
    later = [("c", 1.0, {"correct": 1.0, "style": 1.0}), ("d", 1.0, {"correct": 1.0, "style": 5.0})]
    scored, _ = compute_advantages(_dim_episodes(later), config, {}, returns)
    # correct constant: nothing; style V = [3, 3, 1, 5]: mean 3, sample std sqrt(8/3)
    spread = math.sqrt(8 / 3) + 1e-4
    assert [s.advantage for s in scored] == pytest.approx([-2 / spread, 2 / spread])


def shadow(call_id, of, agent, seq, grade=None, n_tokens=2, source=""):
    return pb.Call(call_id=call_id, agent=agent, seq=seq, adapter="base", prompt_token_ids=[1, 2],
                   completion_token_ids=list(range(20, 20 + n_tokens)), completion_logprobs=[-0.5] * n_tokens,
                   finish_reason="stop", status=200, temperature=0.7, choices=1, shadow_of=of,
                   rewards=[pb.Reward(reward=grade, source=source)] if grade is not None else [])


def test_a_call_and_its_shadows_are_credited_with_their_grades_the_other_calls_with_the_episode():
    ep = episode("e", "", 1.0, [call("a", "planner", 0, rewards=(0.5,)), call("b", "writer", 1),
                                shadow("a1", "a", "planner", 0, 0.0), shadow("a2", "a", "planner", 0, 1.0),
                                shadow("a3", "a", "planner", 0)])
    transitions, skipped = assign(ep, CreditConfig(), agent_filter(".*"))
    assert [(t.seq, t.reward, t.comparison) for t in transitions] == [
        (0, 0.5, "a"), (1, 1.0, ""), (0, 0.0, "a"), (0, 1.0, "a")]
    assert skipped == {"ungraded_shadow": 1}  # never guessed
    # shadows are not steps of the episode: the discount counts the two client calls only
    assert call_credits(ep, CreditConfig(mode="discounted", gamma=0.5)) == {"a": 1.0, "b": 1.0}


def test_an_ungraded_call_keeps_the_episodes_credit_and_its_graded_shadows_still_compare():
    ep = episode("e", "", 1.0, [call("a", "x", 0), shadow("a1", "a", "x", 0, 0.0), shadow("a2", "a", "x", 0, 1.0)])
    transitions, _ = assign(ep, CreditConfig(), agent_filter(".*"))
    assert [(t.reward, t.comparison) for t in transitions] == [(1.0, ""), (0.0, "a"), (1.0, "a")]


def test_a_comparison_group_is_centred_on_itself_and_leaves_the_baseline_alone():
    ep = episode("e", "", 1.0, [call("a", "x", 0, rewards=(0.5,)), call("b", "x", 1),
                                shadow("a1", "a", "x", 0, 0.0), shadow("a2", "a", "x", 0, 1.0)])
    transitions, _ = assign(ep, CreditConfig(), agent_filter(".*"))
    baselines = {"x": Baseline(mean=0.25, var=0.0, seen=10)}
    scored, stats = compute_advantages(transitions, AdvantageConfig(), baselines)
    by_call = {(s.transition.seq, s.transition.reward, s.transition.comparison): s.advantage for s in scored}
    spread = std([0.5, 0.0, 1.0]) + 1e-4
    assert by_call == pytest.approx({(0, 0.5, "a"): 0.0, (0, 0.0, "a"): -0.5 / spread, (0, 1.0, "a"): 0.5 / spread,
                                     (1, 1.0, ""): (1.0 - 0.25) / 0.25})  # b: the singleton baseline, std floor
    assert stats.groups == 1
    assert baselines["x"].seen == 11 and baselines["x"].mean == pytest.approx(0.25 + 0.1 * 0.75)  # b's episode only


def test_a_comparison_group_whose_grades_agree_teaches_nothing():
    ep = episode("e", "", 1.0, [call("a", "x", 0, rewards=(1.0,)), shadow("a1", "a", "x", 0, 1.0)])
    transitions, _ = assign(ep, CreditConfig(), agent_filter(".*"))
    scored, stats = compute_advantages(transitions, AdvantageConfig(), {})
    assert scored == [] and stats.skipped == {"zero_variance_group": 2}


def test_a_lone_graded_member_compares_with_nothing_and_a_clients_feedback_is_not_a_grade():
    lone = episode("e", "", 1.0, [call("a", "x", 0), shadow("a1", "a", "x", 0, 0.0),  # a: its grading failed
                                  shadow("a2", "a", "x", 0, 1.0, n_tokens=40)])  # a2: too long to train
    transitions, skipped = assign(lone, CreditConfig(max_tokens=30), agent_filter(".*"))
    assert [(t.call_id, t.reward, t.comparison) for t in transitions] == [("a", 1.0, "")]  # the episode's credit
    assert skipped == {"too_long": 1, "ungraded_shadow": 1}
    graded = [pb.Reward(reward=g, source="endpoint:rules") for g in (0.25,)]
    client = pb.Call(**{**_fields(call("a", "x", 0)), "rewards": [*graded, pb.Reward(reward=1.0, source="user")]})
    ep = episode("e", "", 1.0, [client, shadow("a1", "a", "x", 0, 0.75, source="endpoint:rules")])
    transitions, _ = assign(ep, CreditConfig(), agent_filter(".*"))
    assert [(t.call_id, t.reward, t.comparison) for t in transitions] == [("a", 0.25, "a"), ("a1", 0.75, "a")]


def _fields(message) -> dict:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}
