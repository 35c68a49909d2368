"""`flywheel report`: what the agents learned, from the store alone (SQL through a running
proxy or on a file), as `report.md` and PNG plots. Works for any deployment.

Evaluation episodes are those whose metadata has `"eval": true` (never trained on); each is
labelled by the adapter versions that served its calls, so an evaluation is attributed to
exactly what answered it even if a swap happened meanwhile. Intervals are 95% normal
intervals of the mean: mean +- 1.96 * sd / sqrt(n).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flywheel.store.summaries import (AGENTS, CANDIDATES, HELDOUT_BY_VERSION, INFRA_ERRORS_BY_VERSION,
                                      LEARNABILITY, TRAIN_BY_VERSION, TRAIN_RUNS)

Fetch = Callable[[str], dict]  # a query -> {"columns", "rows"}


def markdown_table(result: dict) -> str:
    columns, rows = result["columns"], result["rows"]
    if not rows:
        return "_no rows_"
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _column(result: dict, name: str) -> list:
    index = result["columns"].index(name)
    return [row[index] for row in result["rows"]]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions_axis(ax, labels: list[str], ylabel: str, title: str) -> None:
    """One tick per serving combination, its versions one a line."""
    ax.set_xticks(range(len(labels)), [label.replace(" + ", "\n") for label in labels], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _plot_reward(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = _column(result, "served_by")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels)), 3.6))
    ax.errorbar(range(len(labels)), _column(result, "mean_reward"), yerr=_column(result, "ci95"), fmt="o-",
                capsize=4)
    _versions_axis(ax, labels, "mean reward (95% interval)", title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_infra_errors(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = _column(result, "served_by")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels)), 3.6))
    ax.bar(range(len(labels)), _column(result, "infra_error_share"))
    _versions_axis(ax, labels, "share of episodes", title)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def _plot_learnability(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    agents = _column(result, "agent")
    fig, (flat, spread) = plt.subplots(1, 2, figsize=(10, 3.6))
    flat.bar(agents, [v or 0 for v in _column(result, "flat_group_share")])
    flat.set_title("share of groups with equal rewards")
    spread.bar(agents, [v or 0 for v in _column(result, "reward_std")])
    spread.set_title("reward std over episodes")
    _save(fig, path)


def _plot_updates(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [name or "" for name in _column(result, "served_name")]  # "": held by a guard, no version
    agents = sorted({name.rsplit("-v", 1)[0] for name in names if name})
    metrics = ("reward_mean", "loss", "kl", "clip_fraction", "entropy", "tokens_per_s")
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, metric in zip(axes.flat, metrics):
        values = _column(result, metric)
        for agent in agents:
            points = [(int(n.rsplit("-v", 1)[1]), v) for n, v in zip(names, values)
                      if n and n.rsplit("-v", 1)[0] == agent and v is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=agent)
        ax.set_title(metric)
        ax.set_xlabel("version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    _save(fig, path)


def _plot_candidates(result: dict, title: str, path: Path) -> None:
    """Each candidate beside the version it was tested against: mean reward and interval."""
    import matplotlib.pyplot as plt

    names = _column(result, "served_name")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names)), 3.6))
    for side, offset, colour in (("candidate", -0.12, "tab:orange"), ("active", 0.12, "tab:blue")):
        means = [m or 0 for m in _column(result, f"{side}_mean")]
        low = [m - (lo if lo is not None else m) for m, lo in zip(means, _column(result, f"{side}_low"))]
        high = [(hi if hi is not None else m) - m for m, hi in zip(means, _column(result, f"{side}_high"))]
        ax.errorbar([i + offset for i in range(len(names))], means, yerr=[low, high], fmt="o", capsize=4,
                    color=colour, label=side if side == "candidate" else "tested against")
    labels = [f"{n}\n{s}" for n, s in zip(names, _column(result, "status"))]
    _versions_axis(ax, labels, "mean reward (interval)", title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_agents(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    agents = _column(result, "agent")
    fig, (calls, latency) = plt.subplots(1, 2, figsize=(10, 3.6))
    calls.bar(agents, _column(result, "calls"))
    calls.set_title("calls per agent")
    x = range(len(agents))
    latency.bar([i - 0.2 for i in x], _column(result, "p50_ms"), width=0.4, label="p50")
    latency.bar([i + 0.2 for i in x], _column(result, "p95_ms"), width=0.4, label="p95")
    latency.set_xticks(list(x), agents)
    latency.set_title("latency per agent, ms")
    latency.legend(fontsize=8)
    _save(fig, path)


@dataclass(frozen=True)
class Section:
    title: str
    query: str
    note: str
    png: str  # file name of its plot
    draw: Callable[[dict, str, Path], None]  # (result, title, path)


SECTIONS = (
    Section("Held-out reward per version", HELDOUT_BY_VERSION,
            "Evaluation episodes (metadata eval = true), by the adapter versions that served them; "
            "mean and 95% interval.", "heldout_reward.png", _plot_reward),
    Section("Training traffic reward per version", TRAIN_BY_VERSION,
            "All other rewarded episodes, by the versions that served them.", "train_reward.png", _plot_reward),
    Section("Updates", TRAIN_RUNS, "One row per learner update (`train_runs`): a published version, or one "
            "held back by a guard (`held` says which).", "updates.png", _plot_updates),
    Section("Canary candidates", CANDIDATES,
            "Each candidate's live comparison with the version it was tested against, and the decision "
            "(`[promotion]`).", "candidates.png", _plot_candidates),
    Section("Learnability", LEARNABILITY,
            "Per agent: its groups (a task's rewarded attempts, or a call with its graded shadow samples), the "
            "share whose rewards are all equal (they teach nothing), the spread of its rewards, and a warning "
            "when nothing can teach it.", "learnability.png", _plot_learnability),
    Section("Infrastructure failures per version", INFRA_ERRORS_BY_VERSION,
            "Episodes a failed or timed-out upstream call, or the client (`infra_error`), marked as not the "
            "model's doing: never trained on.", "infra_errors.png", _plot_infra_errors),
    Section("Agents", AGENTS, "Calls, tokens and latency per agent (`calls`).", "agents.png", _plot_agents),
)


def write_report(fetch: Fetch, out_dir: Path, source: str) -> Path:
    """Run every section's query, write `report.md` and one PNG per non-empty section; return report.md."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# Flywheel report\n\nSource: {source}. Rebuild with `flywheel report`.\n"]
    for section in SECTIONS:
        result = fetch(section.query)
        parts.append(f"## {section.title}\n\n{section.note}\n\n{markdown_table(result)}\n")
        if result["rows"]:
            section.draw(result, section.title, out_dir / section.png)
            parts.append(f"![{section.title}]({section.png})\n")
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    return report
