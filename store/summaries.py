"""Summaries of the store as SQL: what `flywheel report` writes and `/ui` shows, one copy of each.

Read-only queries, run through the SQL sandbox like a user's. Evaluation episodes are those
whose metadata has `"eval": true`; each is labelled by the adapter versions that served its
calls. Intervals are 95% normal intervals of the mean: mean +- 1.96 * sd / sqrt(n).
"""

from __future__ import annotations

from flywheel.store.schema import IS_EVAL_EPISODE

# Reward per combination of serving versions, for evaluation or for training traffic.
_REWARD_BY_VERSION = f"""
WITH per_episode AS (
  SELECT e.episode_id, e.reward, min(c.created_at) AS started,
         string_agg(DISTINCT c.adapter, ' + ' ORDER BY c.adapter) AS served_by
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE e.reward IS NOT NULL AND {IS_EVAL_EPISODE} = {{evaluation}}
  GROUP BY e.episode_id, e.reward)
SELECT served_by, count(*) AS episodes, round(avg(reward), 3) AS mean_reward,
       round(1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*)), 3) AS ci95,
       strftime(min(started), '%H:%M:%S') AS first_call
FROM per_episode GROUP BY served_by ORDER BY min(started)
"""
HELDOUT_BY_VERSION = _REWARD_BY_VERSION.format(evaluation="true")
TRAIN_BY_VERSION = _REWARD_BY_VERSION.format(evaluation="false")

# Episodes whose outcome was not the model's doing (episodes.infra_error), by serving versions.
INFRA_ERRORS_BY_VERSION = """
WITH per_episode AS (
  SELECT e.episode_id, e.infra_error IS NOT NULL AS infra, min(c.created_at) AS started,
         string_agg(DISTINCT c.adapter, ' + ' ORDER BY c.adapter) AS served_by
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE c.shadow_of IS NULL
  GROUP BY e.episode_id, e.infra_error)
SELECT served_by, count(*) AS episodes, count(*) FILTER (WHERE infra) AS infra_errors,
       round(avg(infra::INTEGER), 3) AS infra_error_share, strftime(min(started), '%H:%M:%S') AS first_call
FROM per_episode GROUP BY served_by ORDER BY min(started)
"""

# Whether each agent can learn from its traffic: its groups (a task's rewarded attempts, or a
# call with its graded shadow samples), the share of them whose rewards are all equal (they
# teach nothing), the spread of its episode rewards, and a warning when nothing can teach it.
LEARNABILITY = f"""
WITH agent_episodes AS (
  SELECT DISTINCT c.agent, e.episode_id, e.task_id, e.reward
  FROM episodes e JOIN calls c USING (episode_id)
  WHERE e.reward IS NOT NULL AND e.infra_error IS NULL AND NOT {IS_EVAL_EPISODE} AND c.shadow_of IS NULL
    AND c.agent <> 'flywheel-judge'),
grades AS (SELECT call_id, arg_max(reward, created_at) AS grade FROM feedback WHERE call_id IS NOT NULL
           GROUP BY call_id),
groups AS (
  SELECT agent, min(reward) = max(reward) AS flat FROM agent_episodes WHERE task_id IS NOT NULL
  GROUP BY agent, task_id HAVING count(*) >= 2
  UNION ALL
  SELECT c.agent, min(g.grade) = max(g.grade) AS flat
  FROM calls c JOIN grades g ON g.call_id = c.call_id JOIN episodes e ON e.episode_id = c.episode_id
  WHERE (c.call_id IN (SELECT shadow_of FROM calls) OR c.shadow_of IS NOT NULL)
    AND e.infra_error IS NULL AND NOT {IS_EVAL_EPISODE}
  GROUP BY c.agent, coalesce(c.shadow_of, c.call_id) HAVING count(*) >= 2),
per_agent AS (
  SELECT agent, count(*) AS groups, avg(flat::INTEGER) AS flat_share, bool_and(flat) AS all_flat
  FROM groups GROUP BY agent)
SELECT a.agent, count(*) AS episodes, coalesce(p.groups, 0) AS groups,
       round(p.flat_share, 3) AS flat_group_share, round(avg(a.reward), 3) AS reward_mean,
       round(stddev_samp(a.reward), 3) AS reward_std,
       CASE WHEN p.groups IS NULL THEN 'no groups: it learns only against its running baseline (give repeated '
                                       || 'attempts a task id, or turn on [grader] shadow_samples)'
            WHEN p.all_flat THEN 'every group''s rewards are equal: nothing teaches it (the task is too hard or '
                                 || 'too easy for it, or the reward takes one value)' END AS warning
FROM agent_episodes a LEFT JOIN per_agent p USING (agent)
GROUP BY a.agent, p.groups, p.flat_share, p.all_flat ORDER BY a.agent
"""

TRAIN_RUNS = """
SELECT strftime(created_at, '%H:%M:%S') AS published, served_name, agent, episodes, transitions, tokens,
       round(reward_mean, 3) AS reward_mean, round(loss, 4) AS loss, round(kl, 4) AS kl,
       round(step_kl, 5) AS step_kl, round(clip_fraction, 4) AS clip_fraction, round(entropy, 3) AS entropy,
       round(grad_norm, 3) AS grad_norm, round(tokens_per_s) AS tokens_per_s, round(seconds, 1) AS seconds, held
FROM train_runs ORDER BY created_at, agent
"""

# Each canary candidate's comparison with the version it was tested against (adapters.comparison):
# episodes, mean reward and interval on each side, the difference's interval, and the decision.
CANDIDATES = """
SELECT served_name, agent, status, comparison->>'$.canary.against' AS against,
       comparison->>'$.canary.basis' AS basis,
       TRY_CAST(comparison->>'$.canary.new.episodes' AS INTEGER) AS candidate_episodes,
       TRY_CAST(comparison->>'$.canary.new.mean_reward' AS DOUBLE) AS candidate_mean,
       TRY_CAST(comparison->>'$.canary.new.interval[0]' AS DOUBLE) AS candidate_low,
       TRY_CAST(comparison->>'$.canary.new.interval[1]' AS DOUBLE) AS candidate_high,
       TRY_CAST(comparison->>'$.canary.old.episodes' AS INTEGER) AS active_episodes,
       TRY_CAST(comparison->>'$.canary.old.mean_reward' AS DOUBLE) AS active_mean,
       TRY_CAST(comparison->>'$.canary.old.interval[0]' AS DOUBLE) AS active_low,
       TRY_CAST(comparison->>'$.canary.old.interval[1]' AS DOUBLE) AS active_high,
       round(epoch(decided_at) - epoch(created_at)) AS decided_after_s, reason
FROM adapters WHERE (comparison->'$.canary') IS NOT NULL ORDER BY created_at
"""

# Client calls per agent; shadow samples (never seen by a client) counted apart, out of the other columns.
AGENTS = """
SELECT agent, count(*) FILTER (WHERE shadow_of IS NULL) AS calls, count(DISTINCT episode_id) AS episodes,
       count(*) FILTER (WHERE status <> 200) AS errors,
       sum(prompt_tokens) FILTER (WHERE shadow_of IS NULL) AS prompt_tokens,
       sum(completion_tokens) FILTER (WHERE shadow_of IS NULL) AS completion_tokens,
       round(quantile_cont(latency_ms, 0.5) FILTER (WHERE shadow_of IS NULL)) AS p50_ms,
       round(quantile_cont(latency_ms, 0.95) FILTER (WHERE shadow_of IS NULL)) AS p95_ms,
       count(*) FILTER (WHERE shadow_of IS NOT NULL) AS shadow_samples,
       string_agg(DISTINCT adapter, ', ' ORDER BY adapter) AS served_by
FROM calls GROUP BY agent ORDER BY agent
"""

# The latest episodes, each with its calls: what was asked, what came back, and the credit
# under the default (identical) rule: the call's own feedback if it has some, else the episode's reward.
# A shadow sample comes right after the call it resamples (same seq), marked `shadow`.
RECENT_EPISODES = f"""
WITH latest AS (
  SELECT e.episode_id, e.task_id, e.status, e.reward, e.created_at, {IS_EVAL_EPISODE} AS eval
  FROM episodes e ORDER BY e.created_at DESC LIMIT 20),
call_reward AS (
  SELECT call_id, arg_max(reward, created_at) AS reward FROM feedback
  WHERE call_id IS NOT NULL AND episode_id IN (SELECT episode_id FROM latest) GROUP BY call_id)
SELECT l.episode_id, l.task_id, l.status, l.reward, l.eval, strftime(l.created_at, '%H:%M:%S') AS started,
       list({{'agent': c.agent, 'adapter': c.adapter, 'status': c.status, 'latency_ms': round(c.latency_ms),
              'prompt': coalesce(json_extract_string(c.request, '$.messages[#-1].content'),
                                 json_extract_string(c.request, '$.input'), json_extract_string(c.request, '$.prompt')),
              'completion': coalesce(json_extract_string(c.response, '$.choices[0].message.content'),
                                     json_extract_string(c.response, '$.choices[0].message.tool_calls'),
                                     json_extract_string(c.response, '$.choices[0].text')),
              'credit': coalesce(r.reward, l.reward), 'shadow': c.shadow_of IS NOT NULL}}
             ORDER BY c.seq, c.shadow_of IS NOT NULL) FILTER (WHERE c.call_id IS NOT NULL) AS calls
FROM latest l LEFT JOIN calls c USING (episode_id) LEFT JOIN call_reward r USING (call_id)
GROUP BY l.episode_id, l.task_id, l.status, l.reward, l.eval, l.created_at ORDER BY l.created_at DESC
"""

# What the live page shows, by panel.
DASHBOARD = {"heldout": HELDOUT_BY_VERSION, "train": TRAIN_BY_VERSION, "updates": TRAIN_RUNS, "agents": AGENTS,
             "episodes": RECENT_EPISODES}
