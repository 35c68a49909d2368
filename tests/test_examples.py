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
