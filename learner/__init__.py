"""Flywheel's learner: LoRA GRPO on the agents' own logged traffic.

How it departs from textbook GRPO (DeepSeekMath), and why:

- Data comes from production traffic, not from a generate step: each LLM call the proxy
  logged is one transition (exact prompt and completion token ids, never re-tokenized),
  and the episode's outcome is credited to every call of the trained agents
  (LightningRL, `credit.py`); `discounted` credit and per-call feedback are options.
- Groups are episodes that share a task id, per agent, and they roll: attempts of a task
  that arrive over several updates are each trained once, in the first update after they
  arrive, against the task's latest `group_size` returns (those already trained on
  included), instead of waiting stale until the group is whole (`group_policy =
  "complete"` waits, as TRL and verl do). Groups whose rewards are all equal are dropped
  (DAPO dynamic sampling). A call without a group (plain production traffic) is scored
  against its agent's running reward baseline (`advantages.py`), unless the proxy resampled
  it (shadow samples, `Call.shadow_of`): then the call and its K shadows, each with its own
  grade, are one group, which is GRPO's group of completions of one prompt, built after the
  fact from one request.
- The sampling policy is vLLM, possibly an older adapter version: tokens served by a
  version `max_staleness` or more behind are dropped, the rest get a truncated importance
  weight min(pi_old / pi_vllm, is_cap) (as TRL's vLLM IS correction). vLLM is started with
  `--logprobs-mode processed_logprobs`, so its logprobs include the sampling temperature,
  and the learner divides its logits by each call's temperature; the mean and max gap
  between the two is reported with every update (`logprob_mismatch_*`).
- The loss is TRL GRPOTrainer's (`loss.py`, tested equal to TRL's code): clip-higher
  (epsilon_high, DAPO), token-level `dapo` aggregation by default, k3 KL to the base model
  only when beta > 0 (default 0, so no reference pass). One optimizer step per batch
  (ratio 1 at the step; `ppo_epochs` > 1 for more).
- One LoRA adapter per agent (or one shared), trained where the base stays frozen; each
  update is published as a new adapter version and hot-swapped into vLLM by the proxy.
- Evaluation episodes (metadata `{"eval": true}`) never reach the learner: the proxy keeps
  them back, so a held-out score stays held out (`flywheel report` reads them per version).

Run it: `flywheel up` starts it with vLLM and the proxy; alone:

    flywheel learner --model DIR --listen 127.0.0.1:8401 --proxy http://127.0.0.1:8400
    flywheel serve --upstream http://127.0.0.1:8000 --learner 127.0.0.1:8401

Settings: `[learner]` in flywheel.toml and its sub-tables `[learner.credit]`,
`[learner.advantages]`, `[learner.loss]`, `[learner.trainer]` (`learner/config.py` says where
each field is documented). `flywheel train --wait` asks for an update now; `flywheel status`
shows the buffer.

What lives where (pure functions first, I/O at the edges):

    credit.py       episode -> one Transition per trained call (pure)
    advantages.py   transitions -> advantages: GRPO groups, running baselines (pure)
    loss.py         the GRPO policy loss over tensors (pure)
    batching.py     transitions -> padded micro-batches
    trainer.py      PolicyTrainer: peft LoRA adapters, log-probs, the update
    updates.py      Learner: plans, scheduling, one update per adapter
    publish.py      Publisher: saved adapters -> the proxy's registry; agents.json
    buffer.py       the durable episode buffer
    service.py      the gRPC service and `serve`
    config.py       LearnerConfig, its sections
    prepare_model.py  the embedded default model, built offline

Imports: flywheel.protos only (the proxy is reached over HTTP, never imported).
"""
