"""Training guards: an update that crosses a limit is kept, not published, and said why; publishing
resumes with the next update within the limits or with --force."""

import dataclasses

import openai

from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import CreditConfig
from flywheel.learner.guards import GuardConfig, UpdateSignals, crossed
from flywheel.learner.trainer import TrainerConfig
from flywheel.proxy.canary import PromotionConfig
from tests.conftest import free_port, wait_buffered
from tests.test_learner_service import TINY_TRAINER, tiny_model  # noqa: F401  (a fixture)
from tests.test_feedback import api
from tests.test_updates import _lora_weights, _traffic

CALM = UpdateSignals(step_kl=0.01, entropy=1.5, mean_length=40, reference_length=40, grad_norm=0.5,
                     clip_fraction=0.0)


def test_each_guard_names_the_limit_it_crossed_and_zero_turns_it_off():
    limits = GuardConfig(max_kl=1.0, min_entropy=0.1, max_length_growth=2.0, max_grad_norm=10.0,
                         max_clip_fraction=0.3)
    assert crossed(CALM, limits) == []
    cases = {"step_kl": (2.5, "step KL 2.5 > max_kl 1"), "entropy": (0.05, "entropy 0.05 < min_entropy 0.1"),
             "mean_length": (100, "mean completion length 100 is 2.50x the first batch's 40 > max_length_growth 2"),
             "grad_norm": (12.0, "gradient norm 12 > max_grad_norm 10"),
             "clip_fraction": (0.4, "clip fraction 0.400 > max_clip_fraction 0.3")}
    for field, (value, said) in cases.items():
        assert crossed(dataclasses.replace(CALM, **{field: value}), limits) == [said]
        off = GuardConfig(**{name: 0.0 for name in ("max_kl", "min_entropy", "max_length_growth", "max_grad_norm",
                                                    "max_clip_fraction")})
        assert crossed(dataclasses.replace(CALM, **{field: value}), off) == []
    nan = float("nan")
    assert crossed(dataclasses.replace(CALM, step_kl=nan, grad_norm=nan), limits) == [
        "step KL nan > max_kl 1", "gradient norm nan > max_grad_norm 10"]


async def _distinct_attempts(proxy, task: str) -> None:
    """Two attempts of `task` with different completions (the fake's length follows max_tokens),
    rewarded 1 and 0: their gradients do not cancel."""
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    for i, (max_tokens, reward) in enumerate(((12, 1.0), (24, 0.0))):
        episode = f"{task}-{i}"
        await client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "solve the task " * 20}], max_tokens=max_tokens,
            extra_headers={"X-Flywheel-Episode": episode, "X-Flywheel-Task": task})
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": reward})
        await api(proxy, "POST", f"/v1/episodes/{episode}/close")


async def test_a_blown_up_step_is_kept_not_published_until_a_calm_update_or_force(
        start_proxy, start_learner, smollm2, tmp_path):
    """On the embedded SmolLM2 (a random tiny model's near-uniform outputs barely move)."""
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05,
                              promotion=PromotionConfig(mode="direct"))
    config = LearnerConfig(model=smollm2, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "state"),
                           min_episodes=0, group_size=2, credit=CreditConfig(skip_truncated=False),
                           trainer=TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, lr=0.3))  # 1000x the default step
    server = await start_learner(config, smollm2)
    await _distinct_attempts(proxy, "t1")
    await wait_buffered(server, 2)
    events = []
    assert await server.learner.update("test", events.append) == []
    [metrics] = [e.metrics for e in events if e.HasField("metrics")]
    assert metrics.step_kl > 1.0 and metrics.held.startswith("step KL")
    assert any("update kept, not published: step KL" in e.error for e in events if e.HasField("error"))
    status = server.learner.status()
    assert dict(status.held) == {"solver": metrics.held} and server.learner.publisher.version("solver") == 0
    assert server.learner.buffer.pending == {}  # the update is kept: its episodes are used
    rows = await proxy.rows("SELECT served_name, version, held, step_kl FROM train_runs")
    assert rows == [{"served_name": None, "version": None, "held": metrics.held,
                     "step_kl": metrics.step_kl}]
    assert await proxy.rows("SELECT count(*) AS n FROM adapters") == [{"n": 0}]
    held_weights = _lora_weights(server.learner)

    # a restarted learner resumes from the held weights, still holding them
    await server.stop()
    server = await start_learner(config, smollm2)
    server.learner.trainer = server.learner._load_trainer()
    resumed = _lora_weights(server.learner)
    assert all((held_weights[k] == resumed[k]).all() for k in held_weights)
    assert dict(server.learner.status().held) == {"solver": metrics.held}

    # --force publishes the held version as it is, with no training
    events = []
    [published] = await server.learner.update("test", events.append, force=True)
    assert published.served_name == "solver-v1" and not any(e.HasField("metrics") for e in events)
    assert dict(server.learner.status().held) == {}
    rows = await proxy.rows("SELECT served_name, held FROM train_runs ORDER BY created_at")
    assert rows[-1] == {"served_name": "solver-v1", "held": f"published by --force despite: {metrics.held}"}


async def test_the_next_update_within_the_limits_publishes_and_ends_the_hold(
        start_proxy, start_learner, tiny_model, tmp_path):  # noqa: F811
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05,
                              promotion=PromotionConfig(mode="direct"))
    config = LearnerConfig(model=tiny_model, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "state"),
                           min_episodes=0, group_size=2, credit=CreditConfig(skip_truncated=False),
                           # a step large enough that its KL stands clear of fp32 rounding (the default lr's
                           # first step on this model moves the policy by ~1e-8, rounding's size), over max_kl
                           trainer=dataclasses.replace(TINY_TRAINER, lr=0.05), guards=GuardConfig(max_kl=1e-12))
    server = await start_learner(config, tiny_model)
    await _traffic(proxy, {"t1": [1.0, 0.0]})
    await wait_buffered(server, 2)
    assert await server.learner.update("test") == []
    assert "solver" in server.learner.status().held
    server.learner.config = dataclasses.replace(config, guards=GuardConfig())  # the limits as shipped
    await _traffic(proxy, {"t2": [0.0, 1.0]})
    await wait_buffered(server, 2)
    [published] = await server.learner.update("test")
    assert published.served_name == "solver-v1" and dict(server.learner.status().held) == {}
    rows = await proxy.rows("SELECT served_name, held FROM train_runs ORDER BY created_at")
    assert [r["served_name"] for r in rows] == [None, "solver-v1"] and rows[1]["held"] is None
