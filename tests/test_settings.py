"""Settings: nested learner sections are the dataclasses themselves, checked when they are loaded."""

import pytest

from flywheel.commands import main
from flywheel.learner.config import LearnerConfig
from flywheel.proxy.config import ProxyConfig
from flywheel.settings import ConfigError, load_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "flywheel.toml"
    path.write_text(text)
    return str(path)


def test_sub_tables_fill_the_sections_and_env_vars_follow_the_path(tmp_path, monkeypatch):
    path = write(tmp_path, """
[learner]
min_episodes = 0
[learner.loss]
loss_type = "dr_grpo"
[learner.credit]
skip_truncated = true
dim_weights = {correct = 1, style = 0.25}
[learner.trainer]
lr = 3e-4
target_modules = ["q_proj", "v_proj"]
""")
    monkeypatch.setenv("FLYWHEEL_LEARNER_TRAINER_LORA_RANK", "8")
    monkeypatch.setenv("FLYWHEEL_LEARNER_ADVANTAGES_SCALE", "none")
    config = load_config(LearnerConfig, "learner", path, {"train_agents": "planner|writer", "model": None})
    assert config.min_episodes == 0 and config.train_agents == "planner|writer"
    assert config.loss.loss_type == "dr_grpo" and config.loss.epsilon == 0.2  # the rest stays default
    assert config.credit.skip_truncated is True and config.credit.dim_weights == {"correct": 1.0, "style": 0.25}
    assert config.trainer.lr == 3e-4 and config.trainer.lora_rank == 8
    assert config.trainer.target_modules == ("q_proj", "v_proj")
    assert config.advantages.scale == "none"


def test_the_rollout_and_the_guards_are_sections_of_their_own(tmp_path, monkeypatch):
    from flywheel.proxy.canary import PromotionConfig

    path = write(tmp_path, """
[promotion]
canary_fraction = 0.1
min_episodes = 50
[learner.guards]
max_kl = 0.5
""")
    monkeypatch.setenv("FLYWHEEL_PROMOTION_MODE", "direct")
    promotion = load_config(PromotionConfig, "promotion", path, {})
    assert (promotion.mode, promotion.canary_fraction, promotion.min_episodes, promotion.margin) == (
        "direct", 0.1, 50, 0.1)
    assert load_config(LearnerConfig, "learner", path, {}).guards.max_kl == 0.5
    monkeypatch.delenv("FLYWHEEL_PROMOTION_MODE")
    with pytest.raises(ConfigError, match="mode must be one of canary, direct"):
        load_config(PromotionConfig, "promotion", write(tmp_path, '[promotion]\nmode = "yolo"'), {})


@pytest.mark.parametrize("text, message", [
    ('[learner.loss]\nloss_type = "drgrpo"', "loss_type must be one of dapo, grpo, dr_grpo; got 'drgrpo'"),
    ('[learner.credit]\nmode = "same"', "mode must be one of identical, discounted"),
    ('[learner.trainer]\nlr = "fast"', "lr must be float, got 'fast'"),
    ('[learner.trainer]\nlearning_rate = 1e-4', "unknown setting(s) learning_rate"),
    ('[learner]\nlr = 1e-4', "unknown setting(s) lr"),  # the old flat name says where it went
    ('[learner]\nloss = 3', "[learner.loss] must be a table"),
], ids=["loss-type", "credit-mode", "type", "unknown-nested", "old-flat-name", "table"])
def test_a_typo_fails_at_load_with_what_is_allowed(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(LearnerConfig, "learner", write(tmp_path, text), {})
    assert message in str(caught.value)


def test_env_values_are_checked_too(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_PROXY_PORT", "eighty")
    with pytest.raises(ConfigError, match="port must be int, got 'eighty'"):
        load_config(ProxyConfig, "proxy", None, {})
    monkeypatch.setenv("FLYWHEEL_PROXY_PORT", "8500")
    monkeypatch.setenv("FLYWHEEL_LEARNER_CREDIT_SKIP_TRUNCATED", "maybe")
    assert load_config(ProxyConfig, "proxy", None, {}).port == 8500
    with pytest.raises(ConfigError, match="skip_truncated must be bool"):
        load_config(LearnerConfig, "learner", None, {})


def test_the_command_turns_a_bad_setting_into_exit_2_and_one_line(tmp_path, capsys):
    path = write(tmp_path, '[learner.loss]\nloss_type = "ppo"')
    assert main(["learner", "--config", path, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flywheel learner: ") and "dapo, grpo, dr_grpo" in err[0]
