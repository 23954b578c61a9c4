"""The study's progress line and its estimate of the time left."""

import pytest

from ternarylm.orchestration.progress import StudyClock


def test_counts_and_no_estimate_before_a_trial_ends():
    clock = StudyClock(2, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert clock.line(now=0) == "0/3 done, 0 running, 3 left"
    clock.start("a", now=0)
    clock.start("b", now=0)
    assert clock.line(now=5) == "0/3 done, 2 running, 1 left"


def test_estimate_fits_fixed_plus_proportional_cost():
    # Durations 10 + 2 x cost: a trial of cost 10 is predicted at 30 s.
    clock = StudyClock(1, {"a": 1.0, "b": 5.0, "c": 10.0})
    for name, seconds in (("a", 12.0), ("b", 20.0)):
        clock.start(name, now=0)
        clock.end(name, now=seconds)
    assert clock.predict(10.0) == pytest.approx(30.0)
    assert clock.seconds_left(now=0) == pytest.approx(30.0)
    assert clock.line(now=0) == "2/3 done, 0 running, 1 left, ~30s to go"


def test_running_trials_count_what_remains_of_them_and_slots_share_the_work():
    clock = StudyClock(2, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    clock.start("a", now=0)
    clock.end("a", now=60)            # one cost seen: every trial predicted at 60 s
    clock.start("b", now=60)
    assert clock.seconds_left(now=100) == pytest.approx((20 + 60 + 60) / 2)
    assert clock.line(now=100).endswith("~1m10s to go")


def test_a_trial_running_past_its_prediction_adds_nothing_and_the_end_says_no_estimate():
    clock = StudyClock(1, {"a": 1.0, "b": 1.0})
    clock.start("a", now=0)
    clock.end("a", now=10)
    clock.start("b", now=10)
    assert clock.seconds_left(now=50) == 0
    clock.end("b", now=50)
    assert clock.line(now=50) == "2/2 done, 0 running, 0 left"


def test_concurrency_must_be_positive():
    with pytest.raises(ValueError, match="concurrency"):
        StudyClock(0, {})
