"""bench/kernels/bench_sparge.py: the benchmark's timing and bookkeeping helpers, on the CPU.

The headline ratios of the kernels issue come from these helpers, so they are tested here with a
simulated GPU clock: turns() must give every contender its own time (whatever the order), set
each contender's environment only around its own calls and rotate the order every round;
parse_ab() must read the A/B specs and stop with a clear message on a malformed one;
add_speedups() must compute the ratios from the headline and, separately, from the numbers of
each contender timed alone.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.environ.get("SPARGE_SOURCE_DIR", "."), "bench", "kernels"))
import bench_sparge as bs  # noqa: E402


class FakeClock:
    """A GPU stand-in: calls advance a clock, events record it (enqueue order = execution order)."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def event_class(self):
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = clock.now

            def elapsed_time(self, other):
                return other.t - self.t

        return Event


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(bs.torch.cuda, "Event", c.event_class())
    monkeypatch.setattr(bs.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bs, "timed", lambda fn, **kw: 1.0)
    return c


def contender(clock, name, ms, env=None):
    def fn():
        clock.log.append((name, os.environ.get(env) if env else None))
        clock.now += ms
    return fn


def test_turns_give_each_contender_its_own_time_and_rotate(clock):
    cs = [("a", contender(clock, "a", 2.0), []), ("b", contender(clock, "b", 0.5), []),
          ("c", contender(clock, "c", 7.0), [])]
    out = bs.turns(cs, budget_s=0.0, per_visit=2, warm=1, min_rounds=6, max_rounds=6)
    assert {k: v[0] for k, v in out.items()} == {"a": 2.0, "b": 0.5, "c": 7.0}
    assert all(v[3] == 12 for v in out.values())  # 6 rounds x 2 timed calls
    firsts = [clock.log[r * 9][0] for r in range(6)]  # 3 contenders x (1 warm + 2 timed) per round
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_turns_set_each_variants_environment_only_around_its_calls(clock, monkeypatch):
    monkeypatch.delenv("SPARGE_TEST_KNOB", raising=False)
    cs = [("default", contender(clock, "default", 1.0, "SPARGE_TEST_KNOB"), []),
          ("v", contender(clock, "v", 1.0, "SPARGE_TEST_KNOB"), [("SPARGE_TEST_KNOB", "7")])]
    bs.turns(cs, budget_s=0.0, min_rounds=4, max_rounds=4)
    assert {env for name, env in clock.log if name == "v"} == {"7"}
    assert {env for name, env in clock.log if name == "default"} == {None}
    assert "SPARGE_TEST_KNOB" not in os.environ


def test_turns_report_median_and_quartiles(clock):
    times = iter([1.0, 5.0, 2.0, 3.0, 4.0, 9.0, 6.0, 7.0])

    def fn():
        clock.now += next(times)
    out = bs.turns([("x", fn, [])], budget_s=0.0, per_visit=2, min_rounds=4, max_rounds=4)
    median, p25, p75, calls = out["x"]
    assert calls == 8 and median == 5.0 and p25 == 3.0 and p75 == 7.0


def test_parse_ab_reads_variants_and_rejects_malformed_ones():
    assert bs.parse_ab("old:A=0+B=1,c16:SPARGE_BWD_CHUNK=16") == [
        ("old", [("A", "0"), ("B", "1")]), ("c16", [("SPARGE_BWD_CHUNK", "16")])]
    assert bs.parse_ab("") == []
    for bad in ("noenv", "x:", ":A=1", "x:A", "x:=1", "x:A=1+B"):
        with pytest.raises(SystemExit, match="bad A/B variant"):
            bs.parse_ab(bad)


def test_add_speedups_from_headline_and_from_each_contender_alone():
    row = {"ours_fwd_ms": 0.5, "cudnn_fwd_ms": 10.0, "flex_fwd_ms": 0.75, "ours_bwd_ms": 2.0,
           "cudnn_bwd_ms": 30.0, "ours_fwd_solo_ms": 0.4, "cudnn_fwd_solo_ms": 10.0,
           "flex_fwd_solo_ms": 0.6}
    bs.add_speedups(row)
    assert row["speedup_fwd_vs_cudnn"] == pytest.approx(20.0)
    assert row["speedup_fwd_vs_flex"] == pytest.approx(1.5)
    assert row["speedup_bwd_vs_cudnn"] == pytest.approx(15.0)
    assert "speedup_bwd_vs_flex" not in row  # no Flex backward in this row
    assert row["speedup_fwd_vs_cudnn_solo"] == pytest.approx(25.0)
    assert row["speedup_fwd_vs_flex_solo"] == pytest.approx(1.5)
    assert "speedup_bwd_vs_cudnn_solo" not in row  # nothing timed alone for the backward
