"""How well a grader agrees with human labels, within groups of attempts at one task (pure).

    spearman:  rank correlation of scores and labels in each group (ties get their mean rank),
               averaged over groups, with a 95% normal interval over groups
    pairs:     of the pairs in a group whose labels differ, the share the scores order the same
               way (a tie in scores counts half), with a 95% Wilson interval
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

_Z = 1.96


@dataclass(frozen=True)
class Agreement:
    groups: int  # groups with two or more labelled episodes
    spearman: float | None  # mean over groups whose labels and scores both vary
    spearman_ci95: float | None  # half-width
    pairs: int
    pair_accuracy: float | None
    pair_ci95: tuple[float, float] | None  # (low, high)


def ranks(values_N: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = sorted(range(len(values_N)), key=lambda i: values_N[i])
    out = [0.0] * len(values_N)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values_N[order[j + 1]] == values_N[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x_N: Sequence[float], y_N: Sequence[float]) -> float | None:
    """Pearson correlation of the ranks; None when either side is constant."""
    rx, ry = ranks(x_N), ranks(y_N)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = math.sqrt(sum((r - mx) ** 2 for r in rx))
    sy = math.sqrt(sum((r - my) ** 2 for r in ry))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def wilson(successes: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    p = successes / n
    centre = (p + _Z ** 2 / (2 * n)) / (1 + _Z ** 2 / n)
    half = _Z * math.sqrt(p * (1 - p) / n + _Z ** 2 / (4 * n * n)) / (1 + _Z ** 2 / n)
    return centre - half, centre + half


def agreement(groups: Sequence[Sequence[tuple[float, float]]]) -> Agreement:
    """Agreement over groups of (score, label) pairs."""
    groups = [g for g in groups if len(g) >= 2]
    rhos = [r for g in groups if (r := spearman([s for s, _ in g], [lab for _, lab in g])) is not None]
    agreed, pairs = 0.0, 0
    for group in groups:
        for (s1, l1), (s2, l2) in combinations(group, 2):
            if l1 != l2:
                pairs += 1
                agreed += 0.5 if s1 == s2 else float((s1 - s2) * (l1 - l2) > 0)
    mean = sum(rhos) / len(rhos) if rhos else None
    spread = (math.sqrt(sum((r - mean) ** 2 for r in rhos) / (len(rhos) - 1)) if len(rhos) > 1 else None)
    return Agreement(
        groups=len(groups), spearman=mean,
        spearman_ci95=_Z * spread / math.sqrt(len(rhos)) if spread is not None else None,
        pairs=pairs, pair_accuracy=agreed / pairs if pairs else None, pair_ci95=wilson(agreed, pairs) if pairs else None)
