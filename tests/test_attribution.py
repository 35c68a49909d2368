from flywheel.proxy.attribution import attribute


def test_path_wins_over_headers_over_metadata():
    body = {"metadata": {"agent": "m-agent", "episode": "m-ep", "task": "m-task"}}
    who = attribute({"agent": "p-agent"}, {"X-Flywheel-Episode": "h-ep"}, body, "default")
    assert (who.agent, who.episode_id, who.task_id) == ("p-agent", "h-ep", "m-task")
    assert "metadata" not in body  # Flywheel's keys are removed; an emptied object goes too


def test_other_metadata_keys_are_forwarded():
    body = {"metadata": {"agent": "a", "user_tag": "keep"}}
    who = attribute({}, {}, body, "default")
    assert who.agent == "a" and body == {"metadata": {"user_tag": "keep"}}


def test_unnamed_call_gets_default_agent_and_a_fresh_episode():
    first = attribute({}, {}, {}, "default")
    second = attribute({}, {}, {}, "default")
    assert first.agent == "default" and first.task_id is None
    assert first.episode_id.startswith("ep-") and first.episode_id != second.episode_id
