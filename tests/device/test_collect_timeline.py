"""One timeline (deploy/collect/timeline.py): arrival clocks, sequence numbers, label rows."""
import numpy as np

from neurohand.deploy.collect.timeline import ArrivalClock, LabelResampler, SequenceUnwrapper


def jittered_arrivals(rate, n, t0, drift=0.0, seed=0, step=1):
    """Counts and arrivals: true time t0 + count / (rate * (1 + drift)) plus a delay that never goes
    below 0.2 ms: mostly small, sometimes (a loaded machine) tens of ms, and bursts of several
    counts arriving together (USB, a reader waking late)."""
    rng = np.random.RandomState(seed)
    counts = np.arange(step, n * step + 1, step)
    true = t0 + counts / (rate * (1.0 + drift))
    delay = 0.0002 + rng.exponential(0.002, size=n)
    delay[rng.rand(n) < 0.02] += rng.uniform(0.01, 0.05, size=int((rng.rand(n) < 0.02).sum()) or 1)[0]
    arrivals = true + delay
    arrivals = np.maximum.accumulate(arrivals)          # bytes never overtake each other
    return counts, true, arrivals


def test_the_lower_envelope_recovers_when_each_count_happened():
    rate = 500.0                      # chip frames of 20 samples at 10 kHz: counts step by 20
    counts, true, arrivals = jittered_arrivals(rate * 20, 5000, 100.0, step=20)
    clock = ArrivalClock(rate * 20)
    errors = []
    for i, (count, t_true, arrival) in enumerate(zip(counts, true, arrivals)):
        clock.add(count, arrival)
        if i % 12 == 0:       # the session refits once per tick (25 ms: 12 frames)
            clock.update()
            errors.append(clock.time_of(count) - t_true)
    errors = np.abs(np.array(errors[40:]))
    # Arrival itself is off by 2 ms on average and tens of ms at worst; the envelope by the floor only.
    assert np.percentile(np.abs(arrivals - true), 99) > 0.008
    assert np.percentile(errors, 99) < 0.001


def test_a_device_clock_that_drifts_is_followed():
    rate = 100.0
    counts, true, arrivals = jittered_arrivals(rate, 6000, 5.0, drift=0.002, seed=1)   # 0.2 %: 2 ms per second
    clock = ArrivalClock(rate)
    errors = []
    for i, (count, t_true, arrival) in enumerate(zip(counts, true, arrivals)):
        clock.add(count, arrival)
        if i % 3 == 0:
            clock.update()
            errors.append(clock.time_of(count) - t_true)
    late = np.abs(np.array(errors[700:]))
    assert np.percentile(late, 99) < 0.003                 # without the period fit it would be 16 ms
    assert abs(clock.period - 1.0 / (rate * 1.002)) < 2e-6
    assert abs(clock.count_at(clock.time_of(1234.5)) - 1234.5) < 1e-6


def test_two_low_neighbours_in_the_middle_do_not_tilt_the_period():
    """The demo's collect stage once placed glove samples 6-9 ms off for a tenth of a second: the lowest
    arrivals of the window's two halves were neighbours across its middle, one frame apart, and 10 us of
    jitter between them tilted the period by 0.1 %.  The period comes from points half a window apart."""
    rate, n = 2000.0, 400                      # 20-sample frames at 2 kHz: 4 s of chip frames
    counts = np.arange(1, n + 1) * 20.0
    true = 50.0 + counts / rate
    rng = np.random.RandomState(3)
    delay = 0.0003 + rng.uniform(0.00003, 0.0001, size=n)
    delay[n // 2 - 1] = 0.00031                # the first half's lowest arrival, at its end
    delay[n // 2] = 0.0003                     # the second half's, right after it: 10 us lower
    clock = ArrivalClock(rate)
    for count, arrival in zip(counts, true + delay):
        clock.add(count, arrival)
    clock.update()
    now = true[-1]
    assert abs(clock.count_at(now) - counts[-1]) / rate < 0.0003       # tilted: 3.6 ms off
    assert abs(clock.period - 1.0 / rate) / (1.0 / rate) < 1e-4


def test_sequence_numbers_wrap_skip_and_restart():
    unwrap = SequenceUnwrapper()
    out = [unwrap.feed(s) for s in (254, 255, 0, 1, 4, 5)]
    assert [c for c, _, _ in out] == [0, 1, 2, 3, 6, 7]
    assert [lost for _, lost, _ in out] == [0, 0, 0, 0, 2, 0]
    unwrap = SequenceUnwrapper()
    assert [unwrap.feed(s) for s in (2 ** 32 - 2, 2 ** 32 - 1, 0)][-1] == (2, 0, False)
    count, lost, restarted = unwrap.feed(70000)         # a jump no loss explains: a restart
    assert restarted and count == 3 and lost == 0
    assert unwrap.feed(None) == (4, 0, False)


def test_rows_interpolate_between_glove_samples_and_wait_for_the_next():
    # Chip at 1000 Hz, labels at 100 Hz (10 samples a row), first row at session sample 5.
    resampler = LabelResampler(5.0, 10.0, 2, max_wait_samples=40.0)
    resampler.add(0.0, [0.0, 10.0])
    resampler.add(20.0, [2.0, 30.0])
    rows, held = resampler.take(50.0)
    # Rows at 5 and 15 lie between the samples; the row at 25 waits for a sample after it.
    assert np.allclose(rows, [[0.5, 15.0], [1.5, 25.0]]) and not held.any()
    resampler.add(40.0, [4.0, 50.0])
    rows, held = resampler.take(50.0)
    assert np.allclose(rows, [[2.5, 35.0], [3.5, 45.0]]) and not held.any() and resampler.next_row == 4


def test_a_late_glove_is_held_after_the_wait_and_the_end_is_filled():
    resampler = LabelResampler(0.0, 10.0, 1, max_wait_samples=40.0)
    resampler.add(0.0, [1.0])
    resampler.add(10.0, [2.0])
    rows, held = resampler.take(30.0)       # row at 10 has its sample; 20 waits (the chip is only 10 past it)
    assert rows.ravel().tolist() == [1.0, 2.0] and not held.any()
    rows, held = resampler.take(75.0)       # rows at 20, 30 are now 40+ samples behind the chip: held
    assert rows.ravel().tolist() == [2.0, 2.0] and held.all()
    resampler.add(50.0, [6.0])
    rows, held = resampler.take(75.0)
    # Row 40 between the samples at 10 and 50; row 50 on one.
    assert rows.ravel().tolist() == [5.0, 6.0] and not held.any()
    rows, held = resampler.take(81.0, final=True)     # the end: every row up to the last chip sample
    assert rows.ravel().tolist() == [6.0, 6.0, 6.0] and held.all()
    assert resampler.next_row == 9 and resampler.held_rows == 5
    rows, _ = resampler.take(81.0)
    assert len(rows) == 0                  # never a row where the chip has no sample yet
