"""The rollout policy's settings and its statistics: a group-sequential non-inferiority test.

A new version of an agent's adapter enters as a `candidate` and serves `canary_fraction` of
the agent's new episodes. Its rewarded episodes are compared with those the `active`
version served over the same period (episodes opened since the candidate arrived; episodes
with an `infra_error` do not count). When both sides have `min_episodes` held-out
evaluation episodes (`metadata.eval`), only those are compared (`basis: "eval"`), else all
rewarded episodes (`basis: "live"`).

The test, for d = mean(candidate) - mean(active) and m = `margin`:

    H0: d <= -m (the candidate is worse by the margin or more)   H1: d > -m (it is not)

- Each side's mean and variance are taken with two pseudo-episodes added, one at the lowest
  and one at the highest reward seen, the range taken to span at least [0, 1] (for 0/1
  rewards this is Agresti-Caffo's interval for a difference of proportions, which keeps its
  coverage at small samples and when a side's rewards are all equal). se = sqrt(var_c / (n_c + 2) + var_a / (n_a + 2)).
- Looks happen when the smaller side reaches n_k = min_episodes * 2^k, k = 0 .. max_looks-1.
  Look k spends alpha_k = alpha / 2^(k+1) of alpha = 1 - confidence (a Bonferroni spending:
  the looks together spend less than alpha, so peeking is paid for). z_k = Phi^-1(1 - alpha_k).
- Promote when d - z_k se > -m. Reject when d + z_k se < -m (worse by the margin, shown).
  At the last look, or after `max_wait_s`, a candidate not shown within the margin is rejected.

Error rates (normal approximation of the mean of bounded rewards): a candidate worse than the
active one by the margin or more is promoted with probability at most 1 - confidence; one at
least as good as the active one minus the margin is rejected as worse with probability at
most 1 - confidence. A candidate that is only a little worse than the margin, or data too
noisy to tell, ends rejected at the last look: the test is conservative, and its power is
the price. For rewards with standard deviation s, a look of n episodes a side promotes an
equal candidate with probability ~ Phi(m / (s sqrt(2 / n)) - z_k): with s = 0.5, m = 0.1 and
z = 2.2 that is 50% at n = 240 and 84% at n = 510.

After promotion (and after a direct registration) the version is watched: its rewarded
episodes are compared, look by look with the same spending, with the last `watch_episodes`
its predecessor served before it went live. It is rolled back when d + z_k se < -m, until
it has served `watch_episodes` rewarded episodes. This comparison is across time, not
concurrent: a change in traffic between the two periods counts against the new version.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal, Sequence

PROMOTE, REJECT, CONTINUE = "promote", "reject", "continue"


@dataclass(frozen=True)
class PromotionConfig:
    # how versions the learner publishes go live: "canary" (as a candidate on a slice of traffic,
    # promoted or rejected by the test above) or "direct" (active for all traffic at once). A version
    # registered by hand is direct unless the request says "canary": true
    mode: Literal["canary", "direct"] = "canary"
    # share of the agent's new episodes a candidate serves (by a seeded hash of the episode id)
    canary_fraction: float = 0.2
    # rewarded episodes each side needs before the first look; later looks at twice as many, and so on
    min_episodes: int = 20
    # how much worse (in mean reward) a candidate may be and still be promoted; also the drop that rolls
    # a promoted version back
    margin: float = 0.1
    # 1 - the test's error rate (see above), for promotion and for rollback
    confidence: float = 0.95
    # looks before a candidate not yet shown within the margin is rejected (the last at min_episodes * 2^(max_looks-1))
    max_looks: int = 5
    # a candidate undecided this long after registration is rejected, with the reason (too little traffic or undecided)
    max_wait_s: float = 3600.0
    # rewarded episodes a newly active version is watched for (rolled back if worse than its predecessor
    # by the margin); 0 = no watch
    watch_episodes: int = 200
    # seconds between checks of candidates and watched versions
    check_interval_s: float = 5.0
    # seed of the episode-id hash that picks the canary slice
    seed: int = 0

    def check(self) -> None:
        """ValueError for settings the test cannot run with."""
        if not 0 < self.canary_fraction < 1:
            raise ValueError(f"[promotion] canary_fraction must be between 0 and 1, got {self.canary_fraction}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"[promotion] confidence must be in [0.5, 1), got {self.confidence}")
        for name in ("min_episodes", "max_looks"):
            if getattr(self, name) < 1:
                raise ValueError(f"[promotion] {name} must be 1 or more")
        if self.margin < 0 or self.max_wait_s <= 0 or self.check_interval_s <= 0 or self.watch_episodes < 0:
            raise ValueError("[promotion] margin and watch_episodes must be 0 or more, max_wait_s and "
                             "check_interval_s more than 0")


def in_canary(episode_id: str, seed: int, fraction: float) -> bool:
    """Whether an episode belongs to the canary slice: hash(seed, episode id) / 2^64 < fraction."""
    digest = hashlib.blake2b(f"{seed}:{episode_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass(frozen=True)
class Arm:
    """One side of a comparison, with the two pseudo-episodes added."""

    episodes: int  # real episodes
    mean: float
    variance: float  # of the adjusted sample (n + 2 values), divided by n + 2

    @property
    def se2(self) -> float:
        """Squared standard error of the adjusted mean: variance / (n + 2)."""
        return self.variance / (self.episodes + 2)

    def interval(self, z: float) -> tuple[float, float]:
        half = z * math.sqrt(self.se2)
        return self.mean - half, self.mean + half


def arm(rewards_N: Sequence[float], low: float, high: float) -> Arm:
    """The side's adjusted mean and variance: rewards_N plus one pseudo-episode at `low` and one at `high`."""
    values = [*rewards_N, low, high]
    mean = math.fsum(values) / len(values)
    return Arm(len(rewards_N), mean, math.fsum((v - mean) ** 2 for v in values) / len(values))


def look_alpha(look: int, alpha: float) -> float:
    """The error look k (0, 1, ...) spends: alpha / 2^(k+1); all looks together spend less than alpha."""
    return alpha / 2 ** (look + 1)


def looks_reached(episodes: int, min_episodes: int) -> int:
    """How many look sizes n_k = min_episodes * 2^k a side of `episodes` has reached (0 below min_episodes)."""
    return 0 if episodes < min_episodes else int(math.log2(episodes / min_episodes)) + 1


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["promote", "reject", "continue"]
    difference: float  # adjusted mean(new) - mean(old)
    lower: float  # difference -/+ z_k se
    upper: float
    alpha: float  # what this look spent


def non_inferiority(new: Arm, old: Arm, margin: float, alpha: float, last: bool) -> Verdict:
    """One look: promote if d - z se > -margin, reject if d + z se < -margin, at the `last` look
    reject what is not promoted, else continue (z = Phi^-1(1 - alpha))."""
    z = NormalDist().inv_cdf(1 - alpha)
    difference = new.mean - old.mean
    half = z * math.sqrt(new.se2 + old.se2)
    lower, upper = difference - half, difference + half
    if lower > -margin:
        outcome = PROMOTE
    elif upper < -margin or last:
        outcome = REJECT
    else:
        outcome = CONTINUE
    return Verdict(outcome, difference, lower, upper, alpha)


def watch_verdict(new: Arm, old: Arm, margin: float, alpha: float) -> Verdict:
    """One look of a promoted version's watch: `reject` (roll back) only if d + z se < -margin."""
    verdict = non_inferiority(new, old, margin, alpha, last=False)
    return verdict if verdict.outcome == REJECT else replace(verdict, outcome=CONTINUE)
