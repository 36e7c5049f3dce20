"""lightning_mobillm.fed.clock on hand-computed cases: pure arithmetic, no model, no sleeping.

Links below run at 8 Mbit/s up (1e6 bytes = 1 s) and 16 Mbit/s down (2e6 bytes = 1 s), without latency
unless a test says otherwise, so every expected time can be checked by hand.
"""

from __future__ import annotations

import math

import pytest

from lightning_mobillm.fed.clock import (
    DeviceWork,
    FedDeviceProfile,
    Upload,
    VirtualClock,
    assign_profiles,
    device_timeline,
    download_done,
    plan_uploads,
    run_async,
    run_rounds,
    upload_arrival,
)
from lightning_mobillm.simulate import DeviceProfile, Link

LINK = Link("8up16down", 8.0, latency_ms=0.0, down_mbit_per_s=16.0)
MB = 1e6


def profile(speed: float = 1.0, link: Link = LINK, **kwargs) -> FedDeviceProfile:
    return FedDeviceProfile(DeviceProfile(f"x{speed}", speed_vs_this_cpu=speed), link, **kwargs)


FAST, SLOW = profile(2.0), profile(0.5)


# --------------------------------------------------------------------------- timelines


def test_upload_arrival_divides_compute_by_speed_and_adds_the_transfer():
    assert upload_arrival(FAST, compute_s=10.0, bytes_up=MB) == 6.0  # 10 / 2 + 1
    assert upload_arrival(SLOW, compute_s=10.0, bytes_up=MB) == 21.0  # 10 / 0.5 + 1
    assert upload_arrival(FAST, compute_s=10.0, bytes_up=MB, start=3.0) == 9.0


def test_latency_is_charged_once_per_transfer_and_not_for_zero_bytes():
    p = profile(2.0, Link("lat", 8.0, latency_ms=20.0))
    assert upload_arrival(p, 10.0, MB) == pytest.approx(5 + 0.02 + 1)
    assert upload_arrival(p, 10.0, 0) == 5.0


def test_download_then_compute_then_upload():
    t = device_timeline(FAST, DeviceWork(compute_s=10.0, bytes_up=MB, bytes_down=2 * MB), device=4)
    assert (t.device, t.downloaded_at, t.computed_at, t.arrived_at) == (4, 1.0, 6.0, 7.0)
    assert (t.compute_s, t.bytes_up, t.bytes_down) == (5.0, MB, 2 * MB)  # compute in virtual seconds
    assert download_done(FAST, 4 * MB, start=2.0) == 4.0


def test_work_waits_for_the_next_window_and_resumes_there():
    p = profile(1.0, windows=((0, 3), (10, 20)))
    # compute 0-3, resumes 10-12; upload 12-13
    assert upload_arrival(p, 5.0, MB) == 13.0
    # starts offline at 4: waits for 10; compute 10-15, upload 15-16
    assert upload_arrival(p, 5.0, MB, start=4.0) == 16.0


def test_an_interrupted_upload_resumes_rather_than_restarts():
    p = profile(1.0, windows=((0, 5.5), (8, 20)))
    # compute 0-5, upload 5-5.5 (half), the other half 8-8.5 (a restart would end at 9)
    assert upload_arrival(p, 5.0, MB) == 8.5
    # with 0.5 s latency the transfer is 1.5 s online: 5-5.25, then 8-9.25 (latency not charged again)
    q = profile(1.0, Link("lat", 8.0, latency_ms=500.0), windows=((0, 5.25), (8, 20)))
    assert upload_arrival(q, 5.0, MB) == 9.25


def test_work_never_ends_when_the_windows_run_out():
    assert math.isinf(upload_arrival(profile(1.0, windows=((0, 3),)), 5.0, MB))


def test_periodic_windows_and_phase():
    p = profile(1.0, windows=((2, 4),), period_s=10.0)
    assert p.online_at(3.0) and not p.online_at(4.0) and p.online_at(2.0)  # online at open, not at close
    assert p.next_online(5.0) == 12.0
    assert p.next_online(1e6 + 5) == 1e6 + 12
    assert p.finish(0.0, 3.0) == 13.0  # 2-4, then 12-13
    shifted = profile(1.0, windows=((2, 4),), period_s=10.0, phase_s=1.0)
    assert shifted.next_online(0.0) == 3.0
    assert shifted.finish(0.0, 3.0) == 14.0  # 3-5, then 13-14


# --------------------------------------------------------------------------- profiles


def test_profiles_are_validated():
    with pytest.raises(ValueError, match="overlapping"):
        profile(windows=((0, 5), (4, 8)))
    with pytest.raises(ValueError, match="periodic windows"):
        profile(windows=((0, 12),), period_s=10.0)
    with pytest.raises(ValueError, match="dropout"):
        profile(dropout=1.5)
    with pytest.raises(ValueError, match="speed"):
        profile(0.0)


def test_a_gflops_profile_needs_this_cpus_gflops():
    phone = FedDeviceProfile.from_names("phone", "50mbit")  # 30 achievable GFLOPS in simulate.PROFILES
    with pytest.raises(ValueError, match="needs speed_vs_this_cpu"):
        phone.speed  # noqa: B018
    with pytest.raises(ValueError, match="needs speed_vs_this_cpu"):
        plan_uploads([phone], [DeviceWork(1.0, MB)])
    assert phone.resolve(cpu_gflops=10.0).speed == 3.0
    assert FedDeviceProfile.from_names("this_cpu", "10mbit").speed == 1.0


def test_assign_profiles_follows_the_weights_and_the_seed():
    a, b = profile(2.0), profile(0.5)
    dealt = assign_profiles(8, [(a, 3.0), (b, 1.0)], seed=0)
    assert (dealt.count(a), dealt.count(b)) == (6, 2)
    assert dealt == assign_profiles(8, {a: 3.0, b: 1.0}, seed=0)
    assert len({tuple(assign_profiles(8, [(a, 3.0), (b, 1.0)], seed=s)) for s in range(5)}) > 1
    three = assign_profiles(3, [(a, 1.0), (b, 1.0)], seed=0)
    assert (three.count(a), three.count(b)) == (2, 1)  # the tie goes to the earlier profile


def test_stagger_gives_periodic_devices_their_own_phase():
    night = profile(1.0, windows=((0, 8),), period_s=24.0)
    dealt = assign_profiles(10, [(night, 1.0), (FAST, 1.0)], seed=3, stagger=True)
    phases = [p.phase_s for p in dealt if p.period_s is not None]
    assert len(phases) == 5 and all(0 <= ph < 24 for ph in phases) and len(set(phases)) == 5
    assert all(p.phase_s == 0 for p in dealt if p.period_s is None)
    assert dealt == assign_profiles(10, [(night, 1.0), (FAST, 1.0)], seed=3, stagger=True)


# --------------------------------------------------------------------------- the event queue


def test_clock_orders_by_time_then_scheduling_order():
    clock = VirtualClock()
    for at, name in ((1.0, "b"), (1.0, "a"), (0.5, "c"), (1.0, "d")):
        clock.schedule(at, name)
    assert clock.peek_time() == 0.5
    assert clock.pop() == (0.5, "c") and clock.now == 0.5
    with pytest.raises(ValueError, match="before|>= now"):
        clock.schedule(0.25, "past")
    clock.schedule(1.0, "e")  # scheduled later at the same time: after the others
    assert [name for _, name in clock] == ["b", "a", "d", "e"]
    assert clock.now == 1.0 and len(clock) == 0
    with pytest.raises(IndexError):
        clock.pop()


def test_events_scheduled_while_iterating_come_out_in_order():
    clock = VirtualClock(start=10.0)
    clock.schedule(12.0, "x")
    seen = []
    for at, name in clock:
        seen.append((at, name))
        if name == "x":
            clock.schedule(at + 1, "y")
            clock.schedule(at, "x2")
    assert seen == [(12.0, "x"), (12.0, "x2"), (13.0, "y")]
    assert isinstance(clock.wall_s, float)


# --------------------------------------------------------------------------- dropout


def test_dropout_is_reproducible_and_does_not_depend_on_n():
    work = [DeviceWork(1.0, MB)] * 100
    flaky = [profile(1.0, dropout=0.3)] * 100
    plan = plan_uploads(flaky, work, seed=7)
    assert plan.dropped == plan_uploads(flaky, work, seed=7).dropped
    assert plan.dropped != plan_uploads(flaky, work, seed=8).dropped
    assert 15 <= len(plan.dropped) <= 45
    assert {u.device for u in plan.uploads}.isdisjoint(plan.dropped)
    assert len(plan.uploads) + len(plan.dropped) == 100
    first_ten = plan_uploads(flaky[:10], work[:10], seed=7).dropped
    assert first_ten == tuple(d for d in plan.dropped if d < 10)
    assert plan_uploads([profile(dropout=0.0)] * 5, work[:5]).dropped == ()
    assert plan_uploads([profile(dropout=1.0)] * 5, work[:5]).dropped == (0, 1, 2, 3, 4)


def test_plan_orders_arrivals_and_lists_devices_whose_windows_ran_out():
    profiles = [SLOW, FAST, profile(1.0, windows=((0, 3),)), profile(1.0)]
    plan = plan_uploads(profiles, [DeviceWork(10.0, MB)] * 4)
    # slow 21, fast 6, the third never, the fourth 11
    assert plan.uploads == (Upload(1, 6.0), Upload(3, 11.0), Upload(0, 21.0))
    assert plan.unavailable == (2,) and plan.dropped == ()
    assert [t.compute_s for t in plan.timelines] == [20.0, 5.0, 10.0, 10.0]


# --------------------------------------------------------------------------- the asynchronous server


def cost(arrival: float, replay: float):
    return lambda kind, uploads: arrival if kind == "arrival" else replay


A, B, C = Upload(0, 1.0), Upload(1, 2.0), Upload(2, 10.0)


def test_async_steps_on_arrival_and_replays_in_the_gaps():
    seen = []
    run = run_async([A, B, C], cost(2.0, 3.0), seen.append, final_replay_steps=1)
    # A 1-3; B (arrived at 2) 3-5; replay 5-8, 8-11 (C lands at 10, waits); C 11-13; one final replay 13-16
    assert [(s.kind, s.start, s.end, s.uploads) for s in run.steps] == [
        ("arrival", 1.0, 3.0, (A,)),
        ("arrival", 3.0, 5.0, (B,)),
        ("replay", 5.0, 8.0, ()),
        ("replay", 8.0, 11.0, ()),
        ("arrival", 11.0, 13.0, (C,)),
        ("replay", 13.0, 16.0, ()),
    ]
    assert list(run.steps) == seen and [s.index for s in seen] == list(range(6))
    assert run.end_s == 16.0 and run.server_busy_s == 15.0  # 3 x 2 + 3 x 3
    assert (run.count("arrival"), run.count("replay"), run.untrained) == (3, 3, ())
    assert run.wall_s >= run.callback_s >= 0.0  # reported, never asserted against a duration


def test_async_without_replay_idles_between_arrivals():
    run = run_async([A, B, C], cost(2.0, 3.0), replay=False, final_replay_steps=5)
    assert [(s.start, s.end) for s in run.steps] == [(1.0, 3.0), (3.0, 5.0), (10.0, 12.0)]
    assert run.end_s == 12.0 and run.count("replay") == 0


def test_async_ties_keep_the_given_order():
    x, y = Upload(5, 1.0), Upload(3, 1.0)
    run = run_async([x, y], cost(1.0, 1.0), replay=False)
    assert [s.uploads for s in run.steps] == [(x,), (y,)]


def test_async_buffer_trains_several_uploads_in_one_step():
    ups = [Upload(0, 0.0), Upload(1, 0.0), Upload(2, 3.0), Upload(3, 3.0), Upload(4, 7.0)]
    run = run_async(ups, cost(1.0, 4.0), buffer=2)
    # (0, 1) 0-1; replay 1-5 (2 and 3 land at 3); (2, 3) 5-6; replay 6-10 (4 lands at 7, alone);
    # nothing else to come: 4 is flushed on its own 10-11
    assert [(s.kind, s.start, [u.device for u in s.uploads]) for s in run.steps] == [
        ("arrival", 0.0, [0, 1]),
        ("replay", 1.0, []),
        ("arrival", 5.0, [2, 3]),
        ("replay", 6.0, []),
        ("arrival", 10.0, [4]),
    ]
    assert run.end_s == 11.0


def test_async_stops_on_until_max_steps_and_callback():
    run = run_async([A, B, C], cost(2.0, 3.0), until_s=9.0, final_replay_steps=1)
    # the replay starting at 8 runs to 11; the next step would start at 11 >= 9
    assert run.end_s == 11.0 and len(run.steps) == 4 and run.untrained == (C,)
    run = run_async([A, B, C], cost(2.0, 3.0), max_steps=2)
    assert len(run.steps) == 2 and run.untrained == (C,)
    run = run_async([A, B, C], cost(2.0, 3.0), lambda s: s.kind == "replay")
    assert len(run.steps) == 3 and run.end_s == 8.0 and run.untrained == (C,)


def test_async_rejects_steps_that_cost_nothing_or_less():
    with pytest.raises(ValueError, match="replay"):
        run_async([A, C], cost(1.0, 0.0))
    with pytest.raises(ValueError, match="arrival"):
        run_async([A], cost(-1.0, 1.0))
    assert run_async([A, B], cost(0.0, 1.0), replay=False).end_s == 2.0  # a free arrival step is fine


# --------------------------------------------------------------------------- the synchronous variant


def test_sync_rounds_wait_for_the_slowest_device():
    work = DeviceWork(compute_s=10.0, bytes_up=MB, bytes_down=2 * MB)
    run = run_rounds([FAST, SLOW], lambda r, d: work, lambda kind, ups: 1.0, rounds=3)
    # fast: 1 + 5 + 1 = 7; slow: 1 + 20 + 1 = 22; + 1 s aggregation = 23 s a round
    assert [(r.start, r.closed_at, r.end) for r in run.rounds] == [(0, 22, 23), (23, 45, 46), (46, 68, 69)]
    assert [u.device for u in run.rounds[0].returned] == [0, 1]
    assert run.rounds[0].timelines[1].arrived_at == 22.0
    assert run.end_s == 69.0 and run.server_busy_s == 3.0
    assert run.wall_s >= run.callback_s >= 0.0


def test_buffer_equal_to_concurrency_equal_to_all_reproduces_a_fedavg_round():
    profiles = [FAST, SLOW, profile(1.0, dropout=0.5), profile(4.0, dropout=0.5)]
    work = [DeviceWork(10.0, MB), DeviceWork(10.0, MB), DeviceWork(10.0, 3 * MB), DeviceWork(40.0, 2 * MB)]
    for seed in range(4):
        plan = plan_uploads(profiles, work, seed=seed)
        run = run_async(plan.uploads, lambda k, u: 4.0, buffer=len(profiles), replay=False)
        sync = run_rounds(profiles, lambda r, d: work[d], lambda k, u: 4.0, rounds=1, seed=seed)
        (step,), (rnd,) = run.steps, sync.rounds
        assert step.uploads == rnd.returned and rnd.dropped == plan.dropped
        assert step.end == rnd.end == max(u.at for u in plan.uploads) + 4.0
    # without dropout, arrivals by hand: 6, 21, 13 (10 + 3), 12 (40 / 4 + 2); the round ends at 21 + 4
    steady = [FAST, SLOW, profile(1.0), profile(4.0)]
    plan = plan_uploads(steady, work)
    assert [u.at for u in plan.uploads] == [6.0, 12.0, 13.0, 21.0]
    assert run_async(plan.uploads, lambda k, u: 4.0, buffer=4, replay=False).end_s == 25.0
    assert run_rounds(steady, lambda r, d: work[d], lambda k, u: 4.0, rounds=1).end_s == 25.0


def test_sync_samples_a_seeded_fraction_of_the_devices():
    profiles = [profile(1.0)] * 10
    kw = dict(rounds=4, fraction=0.3, seed=5)
    run = run_rounds(profiles, lambda r, d: DeviceWork(1.0, MB), lambda k, u: 1.0, **kw)
    assert all(len(r.selected) == 3 and list(r.selected) == sorted(r.selected) for r in run.rounds)
    again = run_rounds(profiles, lambda r, d: DeviceWork(1.0, MB), lambda k, u: 1.0, **kw)
    assert [r.selected for r in run.rounds] == [r.selected for r in again.rounds]
    assert len({r.selected for r in run.rounds}) > 1
    one = run_rounds(profiles, lambda r, d: DeviceWork(1.0, MB), lambda k, u: 1.0, rounds=1, fraction=0.05)
    assert len(one.rounds[0].selected) == 1  # int(0.5) = 0, at least min_devices


def test_sync_dropout_per_round_and_timeout():
    profiles = [FAST, profile(1.0), profile(1.0, dropout=1.0)]
    work = lambda r, d: DeviceWork(10.0, MB)  # noqa: E731 - arrivals 6, 11 (and 11, dropped)
    run = run_rounds(profiles, work, lambda k, u: 1.0, rounds=2)
    assert [r.dropped for r in run.rounds] == [(2,), (2,)]
    assert run.rounds[0].closed_at == 11.0 and run.rounds[1].start == 12.0
    timed = run_rounds(profiles, work, lambda k, u: 1.0, rounds=1, timeout_s=30.0)
    assert timed.rounds[0].closed_at == 30.0 and timed.end_s == 31.0  # a dropout looks like a straggler
    tight = run_rounds([FAST, SLOW], work, lambda k, u: 1.0, rounds=1, timeout_s=10.0)
    (rnd,) = tight.rounds
    assert rnd.stragglers == (1,) and [u.device for u in rnd.returned] == [0] and rnd.end == 11.0


def test_sync_rounds_start_when_devices_are_online_and_stop_when_none_will_be():
    late = profile(1.0, windows=((5, 100),))
    run = run_rounds([late], lambda r, d: DeviceWork(4.0, 0), lambda k, u: 1.0, rounds=1)
    assert run.rounds[0].start == 5.0 and run.end_s == 10.0
    brief = profile(1.0, windows=((0, 10),))
    run = run_rounds([brief], lambda r, d: DeviceWork(4.0, 0), lambda k, u: 1.0, rounds=5)
    assert [(r.start, r.end) for r in run.rounds] == [(0, 5), (5, 10)]  # at 10 it is gone for good
    stuck = run_rounds([brief], lambda r, d: DeviceWork(40.0, 0), lambda k, u: 1.0, rounds=1)
    assert stuck.rounds[0].stragglers == (0,) and stuck.rounds[0].returned == () and stuck.end_s == 0.0
