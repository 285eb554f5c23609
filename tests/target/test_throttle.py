"""Failed-login rate limiting: free failures, a growing delay, the window, and bounded memory."""

from lunsync.target.throttle import LoginThrottle


def test_no_delay_until_the_free_failures_are_used() -> None:
    t = LoginThrottle(free_failures=3, step_s=0.5)
    for i in range(3):
        t.record_failure("10.0.0.1", float(i))
    assert t.delay("10.0.0.1", 3.0) == 0.0
    t.record_failure("10.0.0.1", 3.0)
    assert t.delay("10.0.0.1", 3.0) == 0.5
    t.record_failure("10.0.0.1", 3.1)
    assert t.delay("10.0.0.1", 3.1) == 1.0
    assert t.delay("10.0.0.2", 3.1) == 0.0


def test_delay_is_capped_and_forgotten_after_the_window() -> None:
    t = LoginThrottle(free_failures=1, step_s=1.0, max_delay_s=2.0, window_s=10.0)
    for i in range(10):
        t.record_failure("a", float(i) / 10)
    assert t.delay("a", 1.0) == 2.0
    assert t.delay("a", 12.0) == 0.0


def test_memory_stays_bounded() -> None:
    t = LoginThrottle(max_sources=5)
    for i in range(50):
        t.record_failure(f"10.0.0.{i}", float(i))
    assert len(t._failures) == 5
    assert "10.0.0.49" in t._failures
