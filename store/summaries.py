"""Summaries of the store as SQL: what `flywheel report` writes and `/ui` shows, one copy of each.

Read-only queries, run through the SQL sandbox like a user's. Evaluation episodes are those
whose metadata has `"eval": true`; each is labelled by the adapter versions that served its
calls. Intervals are 95% normal intervals of the mean: mean +- 1.96 * sd / sqrt(n).

Each query is SQL that DuckDB and PostgreSQL both run, with the same columns and values
(tests/test_summaries_postgres.py), so the same text serves either store, also through a
proxy's POST /v1/sql (`flywheel report --url`, `flywheel status`). Where the dialects' own
spellings differ, the helpers below write a form both take: `_round` (PostgreSQL has no
round(double, digits)), `clock` (strftime is DuckDB's, to_char PostgreSQL's), `_IS_EVAL`
(DuckDB's TRY_CAST is not PostgreSQL's), JSON by `->`/`->>` paths, the latest of several
values by `(array_agg(v ORDER BY t DESC))[1]` (arg_max is DuckDB's), a list of objects by
`to_json(array_agg(row))`, and text sorted `COLLATE "C"` (bytewise, as DuckDB sorts, whatever
the PostgreSQL database's collation).
"""

from __future__ import annotations

from flywheel.store.schema import IS_EVAL_EPISODE as _IS_EVAL


def _round(value: str, digits: int = 0) -> str:
    """`round(value, digits)` as DOUBLE in either dialect: half away from zero, as DuckDB's
    round does (PostgreSQL's round(double) rounds half to even, and it has no round(double, digits));
    NaN and infinities stay as they are."""
    x = f"CAST({value} AS FLOAT8)"
    scale = 10 ** digits
    return f"sign({x}) * floor(abs({x}) * {scale} + 0.5) / {scale}" if digits else f"sign({x}) * floor(abs({x}) + 0.5)"


def clock(ts: str, date: bool = False) -> str:
    """The TIMESTAMPTZ `ts` as text 'HH:MM:SS' ('YYYY-MM-DD HH:MM:SS' with `date`), in the
    session's time zone, as DuckDB's strftime writes it; independent of PostgreSQL's DateStyle."""
    part = lambda field, width=2: (  # noqa: E731
        f"lpad(CAST(CAST(floor(extract({field} FROM {ts})) AS INTEGER) AS VARCHAR), {width}, '0')")
    time = f"{part('hour')} || ':' || {part('minute')} || ':' || {part('second')}"
    return f"{part('year', 4)} || '-' || {part('month')} || '-' || {part('day')} || ' ' || {time}" if date else time


_SERVED_BY = "string_agg(DISTINCT c.adapter COLLATE \"C\", ' + ' ORDER BY c.adapter COLLATE \"C\") AS served_by"


# Reward per combination of serving versions, for evaluation or for training traffic.
def _reward_by_version(evaluation: bool) -> str:
    return f"""
WITH per_episode AS (
  SELECT e.episode_id, e.reward, min(c.created_at) AS started, {_SERVED_BY}
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE e.reward IS NOT NULL AND {_IS_EVAL} = {str(evaluation).lower()}
  GROUP BY e.episode_id, e.reward)
SELECT served_by, count(*) AS episodes, {_round('avg(reward)', 3)} AS mean_reward,
       {_round('1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*))', 3)} AS ci95,
       {clock('min(started)')} AS first_call
FROM per_episode GROUP BY served_by ORDER BY min(started)
"""


HELDOUT_BY_VERSION = _reward_by_version(True)
TRAIN_BY_VERSION = _reward_by_version(False)

# Episodes whose outcome was not the model's doing (episodes.infra_error), by serving versions.
INFRA_ERRORS_BY_VERSION = f"""
WITH per_episode AS (
  SELECT e.episode_id, e.infra_error IS NOT NULL AS infra, min(c.created_at) AS started, {_SERVED_BY}
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE c.shadow_of IS NULL
  GROUP BY e.episode_id, e.infra_error)
SELECT served_by, count(*) AS episodes, count(*) FILTER (WHERE infra) AS infra_errors,
       {_round('avg(CAST(infra AS INTEGER))', 3)} AS infra_error_share, {clock('min(started)')} AS first_call
FROM per_episode GROUP BY served_by ORDER BY min(started)
"""

# Whether each agent can learn from its traffic: its groups (a task's rewarded attempts, or a
# call with its graded shadow samples), the share of them whose rewards are all equal (they
# teach nothing), the spread of its episode rewards, and a warning when nothing can teach it.
LEARNABILITY = f"""
WITH agent_episodes AS (
  SELECT DISTINCT c.agent, e.episode_id, e.task_id, e.reward
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE e.reward IS NOT NULL AND e.infra_error IS NULL AND NOT {_IS_EVAL} AND c.shadow_of IS NULL
    AND c.agent <> 'flywheel-judge'),
grades AS (SELECT call_id, (array_agg(reward ORDER BY created_at DESC))[1] AS grade FROM feedback
           WHERE call_id IS NOT NULL GROUP BY call_id),
groups AS (
  SELECT agent, min(reward) = max(reward) AS flat FROM agent_episodes WHERE task_id IS NOT NULL
  GROUP BY agent, task_id HAVING count(*) >= 2
  UNION ALL
  SELECT c.agent, min(g.grade) = max(g.grade) AS flat
  FROM calls c JOIN grades g ON g.call_id = c.call_id JOIN episodes e ON e.episode_id = c.episode_id
  WHERE (c.call_id IN (SELECT shadow_of FROM calls) OR c.shadow_of IS NOT NULL)
    AND e.infra_error IS NULL AND NOT {_IS_EVAL}
  GROUP BY c.agent, coalesce(c.shadow_of, c.call_id) HAVING count(*) >= 2),
per_agent AS (
  SELECT agent, count(*) AS groups, avg(CAST(flat AS INTEGER)) AS flat_share, bool_and(flat) AS all_flat
  FROM groups GROUP BY agent)
SELECT a.agent, count(*) AS episodes, coalesce(p.groups, 0) AS groups,
       {_round('p.flat_share', 3)} AS flat_group_share, {_round('avg(a.reward)', 3)} AS reward_mean,
       {_round('stddev_samp(a.reward)', 3)} AS reward_std,
       CASE WHEN p.groups IS NULL THEN 'no groups: it learns only against its running baseline (give repeated '
                                       || 'attempts a task id, or turn on [grader] shadow_samples)'
            WHEN p.all_flat THEN 'every group''s rewards are equal: nothing teaches it (the task is too hard or '
                                 || 'too easy for it, or the reward takes one value)' END AS warning
FROM agent_episodes a LEFT JOIN per_agent p USING (agent)
GROUP BY a.agent, p.groups, p.flat_share, p.all_flat ORDER BY a.agent COLLATE "C"
"""

TRAIN_RUNS = f"""
SELECT {clock('created_at')} AS published, served_name, agent, episodes, transitions, tokens,
       {_round('reward_mean', 3)} AS reward_mean, {_round('loss', 4)} AS loss, {_round('kl', 4)} AS kl,
       {_round('step_kl', 5)} AS step_kl, {_round('clip_fraction', 4)} AS clip_fraction,
       {_round('entropy', 3)} AS entropy, {_round('grad_norm', 3)} AS grad_norm,
       {_round('tokens_per_s')} AS tokens_per_s, {_round('seconds', 1)} AS seconds, held
FROM train_runs ORDER BY created_at, agent COLLATE "C"
"""


# Each canary candidate's comparison with the version it was tested against (adapters.comparison):
# episodes, mean reward and interval on each side, the difference's interval, and the decision.
def _canary(path: str, sql_type: str = "") -> str:
    """A value of the comparison's canary section (`path`: keys and array indexes, '.'-separated), as text or `sql_type`."""
    *keys, last = [int(p) if p.isdigit() else f"'{p}'" for p in path.split(".")]
    value = "comparison->'canary'" + "".join(f"->{k}" for k in keys) + f"->>{last}"
    return f"CAST({value} AS {sql_type})" if sql_type else value


CANDIDATES = f"""
SELECT served_name, agent, status, {_canary('against')} AS against, {_canary('basis')} AS basis,
       {_canary('new.episodes', 'INTEGER')} AS candidate_episodes,
       {_canary('new.mean_reward', 'FLOAT8')} AS candidate_mean,
       {_canary('new.interval.0', 'FLOAT8')} AS candidate_low,
       {_canary('new.interval.1', 'FLOAT8')} AS candidate_high,
       {_canary('old.episodes', 'INTEGER')} AS active_episodes,
       {_canary('old.mean_reward', 'FLOAT8')} AS active_mean,
       {_canary('old.interval.0', 'FLOAT8')} AS active_low,
       {_canary('old.interval.1', 'FLOAT8')} AS active_high,
       {_round('extract(epoch FROM decided_at) - extract(epoch FROM created_at)')} AS decided_after_s, reason
FROM adapters WHERE (comparison->'canary') IS NOT NULL ORDER BY created_at
"""

# Client calls per agent; shadow samples (never seen by a client) counted apart, out of the other columns.
_CLIENT = "FILTER (WHERE shadow_of IS NULL)"
AGENTS = f"""
SELECT agent, count(*) {_CLIENT} AS calls, count(DISTINCT episode_id) AS episodes,
       count(*) FILTER (WHERE status <> 200) AS errors,
       CAST(sum(prompt_tokens) {_CLIENT} AS BIGINT) AS prompt_tokens,
       CAST(sum(completion_tokens) {_CLIENT} AS BIGINT) AS completion_tokens,
       {_round(f'percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) {_CLIENT}')} AS p50_ms,
       {_round(f'percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) {_CLIENT}')} AS p95_ms,
       count(*) FILTER (WHERE shadow_of IS NOT NULL) AS shadow_samples,
       string_agg(DISTINCT adapter COLLATE "C", ', ' ORDER BY adapter COLLATE "C") AS served_by
FROM calls GROUP BY agent ORDER BY agent COLLATE "C"
"""

# The latest episodes, each with its calls: what was asked, what came back, and the credit
# under the default (identical) rule: the call's own feedback if it has some, else the episode's reward.
# A shadow sample comes right after the call it resamples (same seq), marked `shadow`.
# (`calls`: JSON, a list of objects whose keys are the columns of `shown`; JSON text in them, a
# completion's tool_calls, is as each database writes it.)
RECENT_EPISODES = f"""
WITH latest AS (
  SELECT e.episode_id, e.task_id, e.status, e.reward, e.created_at, {_IS_EVAL} AS eval
  FROM episodes e ORDER BY e.created_at DESC, e.episode_id LIMIT 20),
call_reward AS (
  SELECT call_id, (array_agg(reward ORDER BY created_at DESC))[1] AS reward FROM feedback
  WHERE call_id IS NOT NULL AND episode_id IN (SELECT episode_id FROM latest) GROUP BY call_id)
SELECT l.episode_id, l.task_id, l.status, l.reward, l.eval, {clock('l.created_at')} AS started,
       to_json(array_agg(shown ORDER BY c.seq, c.shadow_of IS NOT NULL, c.created_at, c.call_id) FILTER (WHERE c.call_id IS NOT NULL)) AS calls
FROM latest l LEFT JOIN calls c USING (episode_id) LEFT JOIN call_reward r USING (call_id)
  LEFT JOIN LATERAL (
    SELECT c.agent AS agent, c.adapter AS adapter, c.status AS status, {_round('c.latency_ms')} AS latency_ms,
           coalesce(c.request->'messages'->-1->>'content', c.request->>'input', c.request->>'prompt') AS prompt,
           coalesce(c.response->'choices'->0->'message'->>'content',
                    c.response->'choices'->0->'message'->>'tool_calls',
                    c.response->'choices'->0->>'text') AS completion,
           coalesce(r.reward, l.reward) AS credit, c.shadow_of IS NOT NULL AS shadow) shown ON true
GROUP BY l.episode_id, l.task_id, l.status, l.reward, l.eval, l.created_at ORDER BY l.created_at DESC, l.episode_id
"""

# What the live page shows, by panel.
DASHBOARD = {"heldout": HELDOUT_BY_VERSION, "train": TRAIN_BY_VERSION, "updates": TRAIN_RUNS, "agents": AGENTS,
             "episodes": RECENT_EPISODES}
