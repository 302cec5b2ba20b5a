"""The matrix's assertion itself must be able to fail in each of its categories."""

import pytest
import torch

from badinput import TALLY, expect_clean_error


@pytest.fixture(autouse=True)
def _keep_tally():
    saved = TALLY.copy()
    TALLY.clear()  # count only this test's cases, whatever ran before it
    yield
    TALLY.clear()
    TALLY.update(saved)


def test_each_failure_category_is_caught():
    t = torch.zeros(3)

    def mutate_then_raise():
        t.add_(1)
        raise ValueError("x: bad")

    def raise_key():
        raise KeyError("x")

    with pytest.raises(AssertionError, match="accepted"):
        expect_clean_error(lambda: None, arg="x")
    with pytest.raises(AssertionError, match="KeyError"):
        expect_clean_error(raise_key, arg="x")
    with pytest.raises(AssertionError, match="does not name"):
        expect_clean_error(lambda: int("a"), arg="x")
    with pytest.raises(AssertionError, match="changed"):
        expect_clean_error(mutate_then_raise, arg="x", state=[t])
    assert TALLY["accepted"] == TALLY["wrong type"] == TALLY["unnamed argument"] == TALLY["state changed"] == 1


def test_nan_state_compares_equal_to_itself():
    t = torch.tensor([float("nan"), -0.0])

    def raise_named():
        raise ValueError("x: bad")

    expect_clean_error(raise_named, arg="x", state=[t, {"a": [t]}])
    assert TALLY["clean"] == 1
