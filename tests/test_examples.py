"""The example's task set and grader."""

from examples.arithmetic import Task, calculate, final_answer, grade, task_split


def test_splits_are_fixed_by_seed_and_disjoint():
    train, heldout = task_split(seed=3, n_train=50, n_heldout=20)
    again, _ = task_split(seed=3, n_train=50, n_heldout=20)
    assert train == again and len(train) == 50 and len(heldout) == 20
    assert not {t.question for t in train} & {t.question for t in heldout}
    assert train != task_split(seed=4, n_train=50, n_heldout=20)[0]
    assert all(eval(t.expression) == t.answer for t in train + heldout)


def test_calculator_and_answer_parsing():
    assert calculate("12 + 7") == ("12 + 7", 19)
    assert calculate("so 3 x 4 = 12") == ("3 * 4", 12)
    assert calculate("no maths here") is None
    assert final_answer("Tom has 5.\nAnswer: 12") == 12
    assert final_answer("maybe 3 or 4") == 4
    assert final_answer("nothing") is None


def test_grader_rewards_the_right_number_not_the_format():
    task = Task("t", "Tom has 3 pens and gets 4 more. How many pens does Tom have now?", "3 + 4", 7)
    assert grade(task, "Tom has 7 pens.\nAnswer: 7", "3 + 4") == (
        1.0, {"answer_correct": 1.0, "expression_correct": 1.0, "has_answer_line": 1.0})
    assert grade(task, "Answer: 8", "3 + 5")[0] == 0.0  # perfect format, wrong substance
    assert grade(task, "Answer:", "")[0] == 0.0
    assert grade(task, "He ends with 7", "3 - 4") == (
        1.0, {"answer_correct": 1.0, "expression_correct": 0.0, "has_answer_line": 0.0})


def test_calendar_tasks_tool_and_grader():
    from examples.calendar_task import DAYS, count_days, final_day, grade, task_split as calendar_split

    train, heldout = calendar_split(seed=0, n_train=40, n_heldout=10)
    assert len(train) == 40 and not {t.question for t in train} & {t.question for t in heldout}
    for task in train:
        assert count_days(task.expression)[1] == task.answer
    assert count_days("Monday + 3") == ("Monday + 3", DAYS.index("Thursday"))
    assert count_days("sunday - 8") == ("Sunday - 8", DAYS.index("Saturday"))
    assert final_day("It is Friday... no.\nAnswer: Tuesday") == DAYS.index("Tuesday")
    task = train[0]
    assert grade(task, f"Answer: {DAYS[task.answer]}", task.expression)[0] == 1.0
    assert grade(task, f"Answer: {DAYS[(task.answer + 1) % 7]}", task.expression)[0] == 0.0


def test_demo_traffic_shapes():
    from examples.demo import TRICKLE_ROUNDS, round_runs

    train, _ = task_split(seed=0, n_train=40, n_heldout=1)
    grouped = round_runs(train, 2, "grouped", tasks_per_round=2, group_size=4)
    assert [t.task_id for t in grouped] == [train[2].task_id] * 4 + [train[3].task_id] * 4
    singles = round_runs(train, 1, "singletons", tasks_per_round=2, group_size=4)
    assert len({t.task_id for t in singles}) == 8
    attempts: dict[str, int] = {}
    for round_no in range(1, 9):
        for t in round_runs(train, round_no, "trickle", tasks_per_round=2, group_size=8):
            attempts[t.task_id] = attempts.get(t.task_id, 0) + 1
    first = train[0].task_id  # rounds 1-4, two attempts each
    assert attempts[first] == 8 and TRICKLE_ROUNDS == 4
    assert round_runs(train, 1, "trickle", 2, 8) == [train[0]] * 2 + [train[1]] * 2
