"""Continual-learning metrics on matrices computed by hand."""

import numpy as np
import pytest
import torch

from forgetcore.evaluation import continual as m

# R[i][j]: accuracy on task j after training task i. Task 0's accuracy rises after task 1
# (0.9 -> 0.95) and then falls to 0.5, so forgetting (from the best) and BWT (from the
# diagonal) differ.
R = [[0.90, 0.05, 0.20],
     [0.95, 0.80, 0.30],
     [0.50, 0.70, 0.95]]
B = [0.10, 0.00, 0.20]


def test_hand_computed():
    assert m.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert m.backward_transfer(R) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)  # -0.25
    assert m.average_forgetting(R) == pytest.approx(((0.95 - 0.50) + (0.80 - 0.70)) / 2)  # 0.275
    assert m.forward_transfer(R, B) == pytest.approx(((0.05 - 0.00) + (0.30 - 0.20)) / 2)  # 0.075
    s = m.summary(R, B)
    assert s == pytest.approx({"acc": 0.716666667, "forgetting": 0.275, "bwt": -0.25, "fwt": 0.075})


def test_partial_matrix_uses_rows_seen_so_far():
    part = [[0.9, 0.1, np.nan], [0.6, 0.8, None]]  # two of three tasks trained; NaN/None unused
    assert m.average_accuracy(part) == pytest.approx(0.7)
    assert m.backward_transfer(part) == pytest.approx(-0.3)
    assert m.average_forgetting(part) == pytest.approx(0.3)
    assert m.forward_transfer(part, [0.0, 0.2, 0.5]) == pytest.approx(-0.1)
    assert m.summary([[0.7, 0.0]]) == {"acc": pytest.approx(0.7)}  # one task: no transfer metrics


def test_forgetting_takes_max_over_every_earlier_row():
    # RWalk's max runs over all earlier rows l < k: here task 1 scored 0.85 before it was trained
    # (row 0), above its 0.8 after training, so its forgetting counts from 0.85.
    r = [[0.9, 0.85, 0.0], [0.9, 0.80, 0.0], [0.9, 0.70, 0.9]]
    assert m.average_forgetting(r) == pytest.approx((0.0 + 0.15) / 2)
    assert m.backward_transfer(r) == pytest.approx((0.0 - 0.10) / 2)


def test_perfect_retention_and_inputs():
    eye = np.eye(4)
    for r in (eye, torch.tensor(eye), eye.tolist(), {"R": eye.tolist()}):
        assert m.average_accuracy(r) == pytest.approx(0.25)
        assert m.average_forgetting(r) == pytest.approx(1.0)
        assert m.backward_transfer(r) == pytest.approx(-1.0)
    keep = np.tril(np.ones((4, 4)))
    assert (m.average_accuracy(keep), m.average_forgetting(keep), m.backward_transfer(keep)) == (1.0, 0.0, 0.0)
    assert m.forward_transfer(keep, torch.zeros(4)) == 0.0
    assert m.accuracy_matrix(R).dtype == np.float64


@pytest.mark.parametrize("call,match,exc", [
    (lambda: m.backward_transfer([[0.5, 0.1]]), "^R: backward transfer needs at least 2", ValueError),
    (lambda: m.average_forgetting([[0.5]]), "^R: forgetting needs at least 2", ValueError),
    (lambda: m.forward_transfer([[0.5, 0.0]], [0, 0]), "^R: forward transfer needs", ValueError),
    (lambda: m.average_accuracy([1, 2, 3]), r"^R: expected a matrix of shape \(n, T\)", ValueError),
    (lambda: m.average_accuracy(np.zeros((3, 2))), r"^R: expected a matrix of shape \(n, T\) with 1 <= n <= T",
     ValueError),
    (lambda: m.average_accuracy([[np.nan, 0.0], [0.5, 0.5]]), "^R: expected finite accuracies", ValueError),
    (lambda: m.average_accuracy([["a", "b"]]), "^R: expected a 2-D matrix of numbers", TypeError),
    (lambda: m.average_accuracy({"acc": 1}), "^R: expected a matrix or a Trainer.fit", ValueError),
    (lambda: m.forward_transfer(R, [0.1, 0.2]), r"^b: expected one accuracy per task \(at least 3\)", ValueError),
    (lambda: m.forward_transfer(R, [0.1, np.nan, 0.2]), "^R: forward transfer needs finite", ValueError),
])
def test_bad_input(call, match, exc):
    with pytest.raises(exc, match=match):
        call()
