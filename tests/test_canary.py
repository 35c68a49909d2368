"""The rollout test's pure parts: the canary hash, the adjusted arms, the looks, and its error rates."""

import math
import random
from statistics import NormalDist

import pytest

from flywheel.proxy.canary import (CONTINUE, PROMOTE, REJECT, PromotionConfig, arm, in_canary, look_alpha,
                                   looks_reached, non_inferiority, watch_verdict)


def test_the_canary_slice_is_the_fraction_and_fixed_by_seed_and_episode():
    ids = [f"ep-{i}" for i in range(20_000)]
    share = sum(in_canary(i, 0, 0.2) for i in ids) / len(ids)
    assert abs(share - 0.2) < 0.015
    assert [in_canary(i, 0, 0.2) for i in ids[:200]] == [in_canary(i, 0, 0.2) for i in ids[:200]]
    assert [in_canary(i, 0, 0.5) for i in ids[:200]] != [in_canary(i, 1, 0.5) for i in ids[:200]]
    assert all(in_canary(i, 0, 0.2) <= in_canary(i, 0, 0.3) for i in ids)  # a larger slice contains the smaller


def test_an_arm_adds_one_pseudo_episode_at_each_end_of_the_range():
    side = arm([1, 1, 1, 0], 0, 1)  # values 1,1,1,0,0,1: mean 4/6, variance 2/9
    assert side.episodes == 4
    assert side.mean == pytest.approx(4 / 6)
    assert side.variance == pytest.approx(2 / 9)
    assert side.se2 == pytest.approx(2 / 9 / 6)
    low, high = side.interval(2.0)
    assert high - low == pytest.approx(4 * math.sqrt(2 / 54))


def test_looks_double_in_size_and_spend_less_than_alpha_together():
    assert [looks_reached(n, 20) for n in (0, 19, 20, 39, 40, 79, 80, 160)] == [0, 0, 1, 1, 2, 2, 3, 4]
    assert [look_alpha(k, 0.05) for k in range(3)] == [0.025, 0.0125, 0.00625]
    assert sum(look_alpha(k, 0.05) for k in range(40)) < 0.05


def test_one_look_promotes_rejects_or_waits_by_the_difference_interval():
    perfect = arm([1] * 20, 0, 1)  # mean 21/22, variance (21/22)(1/22)
    se = math.sqrt(2 * (21 / 22) * (1 / 22) / 22)
    half = 1.959964 * se  # z at alpha 0.025: 0.1231
    wait = non_inferiority(perfect, perfect, margin=0.1, alpha=0.025, last=False)
    assert wait.outcome == CONTINUE and wait.difference == 0
    assert (wait.lower, wait.upper) == pytest.approx((-half, half), abs=1e-5)
    assert non_inferiority(perfect, perfect, margin=0.15, alpha=0.025, last=False).outcome == PROMOTE
    assert non_inferiority(perfect, perfect, margin=0.1, alpha=0.025, last=True).outcome == REJECT
    broken = arm([0] * 20, 0, 1)  # mean 1/22
    worse = non_inferiority(broken, perfect, margin=0.1, alpha=0.025, last=False)
    assert worse.outcome == REJECT and worse.difference == pytest.approx(-20 / 22)
    assert watch_verdict(broken, perfect, 0.1, 0.025).outcome == REJECT
    assert watch_verdict(perfect, perfect, 0.15, 0.025).outcome == CONTINUE  # a watch never "promotes"


def sequential_run(rng, p_new, p_old, config):
    """One candidate's test to its end on Bernoulli rewards, looks as the rollout takes them."""
    alpha = 1 - config.confidence
    for look in range(config.max_looks):
        n = config.min_episodes * 2 ** look
        new = arm([float(rng.random() < p_new) for _ in range(n)], 0, 1)
        old = arm([float(rng.random() < p_old) for _ in range(n)], 0, 1)
        verdict = non_inferiority(new, old, config.margin, look_alpha(look, alpha), look == config.max_looks - 1)
        if verdict.outcome != CONTINUE:
            return verdict.outcome, look
    raise AssertionError("the last look decides")


def test_the_error_rates_hold_with_peeking():
    """Simulated with fresh samples per look (independent looks err more often than nested ones)."""
    config = PromotionConfig(min_episodes=20, margin=0.1, confidence=0.9, max_looks=4)
    rng = random.Random(7)
    runs = 1500
    # worse by exactly the margin: promoted at most 1 - confidence of the time
    worse = [sequential_run(rng, 0.4, 0.5, config) for _ in range(runs)]
    assert sum(outcome == PROMOTE for outcome, _ in worse) / runs <= 0.1 + 0.02
    # equal: rejected as worse by the margin before the last look at most 1 - confidence of the time,
    # and promoted at least as often as the docstring's power at the last look alone predicts
    equal = [sequential_run(rng, 0.5, 0.5, config) for _ in range(400)]
    assert sum(outcome == REJECT and look < 3 for outcome, look in equal) / len(equal) <= 0.1
    z_last = NormalDist().inv_cdf(1 - look_alpha(3, 0.1))
    predicted = NormalDist().cdf(0.1 / (0.5 * math.sqrt(2 / 160)) - z_last)  # 0.24
    assert sum(outcome == PROMOTE for outcome, _ in equal) / len(equal) >= predicted
    # clearly broken: always rejected, nearly always at the first look
    broken = [sequential_run(rng, 0.0, 0.5, config) for _ in range(200)]
    assert all(outcome == REJECT for outcome, _ in broken) and sum(look == 0 for _, look in broken) > 180


def test_settings_that_cannot_work_are_refused():
    for bad in ({"canary_fraction": 0}, {"canary_fraction": 1}, {"confidence": 1}, {"min_episodes": 0},
                {"max_wait_s": 0}, {"margin": -0.1}):
        with pytest.raises(ValueError):
            PromotionConfig(**bad).check()
    PromotionConfig().check()
