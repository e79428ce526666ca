"""Lab Streaming Layer out and in, with the real pylsl and liblsl, on this machine only.

liblsl is told (LSLAPICFG, set before its first use in this process) to
resolve on this machine only (``ResolveScope = machine``, no IPv6), and each
test uses stream names of its own, so nothing leaves the machine and parallel
runs do not see each other's streams.  Those tests are skipped without pylsl
(the 'lab' extra); the gap rule and the service's unit are tested without it.

The bundle is the device tests' small trained run (4 channels, 2 kHz,
20 ms stride); the signal is the held-out continuation of its simulated
session, so a decode through LSL is a decode of the data the model knows.
"""
import itertools
import json
import os
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.bundle import make_bundle
from neurohand.deploy.cli import main as cli
from neurohand.deploy.demo import write_session_parts
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.streams.source import BlockParser, GapDetector, SampleChunk
from neurohand.firmware_bridge.virtual.hand import VirtualHand
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

try:
    import pylsl
except ImportError:     # pylsl missing, or liblsl not found by it
    pylsl = None
needs_lsl = pytest.mark.skipif(pylsl is None, reason="pylsl and liblsl (the 'lab' extra) are not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = os.path.join(HERE, "..", "device", "data", "replay_run")
HELDOUT_S = 8.0
LSL_CONFIG = "[ports]\nIPv6 = disable\n\n[multicast]\nResolveScope = machine\n\n[log]\nlevel = -3\n"
_names = itertools.count()


def stream_name(what):
    return "neurohand-test-{}-{}-{}".format(what, os.getpid(), next(_names))


@pytest.fixture(scope="module")
def machine_only_lsl(tmp_path_factory):
    config = tmp_path_factory.mktemp("lsl") / "lsl_api.cfg"
    config.write_text(LSL_CONFIG)
    previous = os.environ.get("LSLAPICFG")
    os.environ["LSLAPICFG"] = str(config)
    yield
    if previous is None:
        os.environ.pop("LSLAPICFG", None)
    else:
        os.environ["LSLAPICFG"] = previous


@pytest.fixture(scope="module")
def data(tmp_path_factory, machine_only_lsl):
    """(bundle, held-out recording, its signals in µV float32, rate); the bundle passed its self-test on numpy."""
    folder = tmp_path_factory.mktemp("lsl-bundle")
    bundle = str(folder / "bundle")
    make_bundle(RUN_DIR, bundle)
    with open(os.path.join(RUN_DIR, "config.json")) as handle:
        fixture = json.load(handle)["fixture"]
    recording = str(folder / "heldout.nhr")
    start = fixture["train_s"]
    write_session_parts(SimulatorConfig(**fixture["session"]), [(recording, start, start + HELDOUT_S)])
    assert cli.main(["selftest", bundle, "--backend", "numpy"]) == 0
    with open_recording(recording) as opened:
        microvolts = np.multiply(opened.read_signals(), np.asarray(opened.scale_uv, dtype=np.float32),
                                 dtype=np.float32)
        rate = float(opened.signal_rate)
    return bundle, recording, microvolts, rate


class Amplifier(object):
    """An LSL outlet streaming ``samples`` (n, channels) at ``rate`` in real time, as an amplifier's app.

    Starts pushing once a consumer is connected; timestamps are exact (first
    sample at t0, then 1/rate apart) except that ``skip`` samples starting at
    ``skip_at`` are never sent (a gap: their time passes, their samples are
    lost).  After the samples it holds the stream open until :meth:`close`,
    or drops it at once with ``vanish`` (its app crashed).
    """

    def __init__(self, name, samples, rate, units="microvolts", chunk=20, skip_at=None, skip=0, vanish=False,
                 source_id="amp-1"):
        n_channels = samples.shape[1]
        info = pylsl.StreamInfo(name, "EEG", n_channels, rate, pylsl.cf_float32, source_id)
        channels = info.desc().append_child("channels")
        for index in range(n_channels):
            channel = channels.append_child("channel")
            channel.append_child_value("label", "ch{:02d}".format(index))
            if units is not None:
                channel.append_child_value("unit", units)
        self.outlet = pylsl.StreamOutlet(info)
        self.samples, self.rate, self.chunk = samples, rate, chunk
        self.skip_at, self.skip, self.vanish = skip_at, skip, vanish
        self.pushed = 0
        self.started = None       # local_clock when the first sample was pushed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self.outlet.wait_for_consumers(0.1):
            if self._stop.is_set():
                return
        t0 = self.started = pylsl.local_clock()
        index, n = 0, self.samples.shape[0]
        while index < n and not self._stop.is_set():
            if self.skip_at is not None and index == self.skip_at:
                index += self.skip
            block = self.samples[index:index + self.chunk]
            last = index + block.shape[0] - 1
            wait = t0 + (last + 1) / self.rate - pylsl.local_clock()
            if wait > 0:
                time.sleep(wait)
            self.outlet.push_chunk(np.ascontiguousarray(block), t0 + last / self.rate)
            self.pushed += block.shape[0]
            index += block.shape[0]
        if self.vanish:
            self.outlet = None          # destroyed: its consumers lose the stream
        else:
            self._stop.wait()

    def close(self):
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)
        self.outlet = None


@pytest.fixture
def hand():
    hand = VirtualHand("neurohand").start()
    yield hand
    hand.stop()


def run_on_lsl(capsys, bundle, name, hand, seconds, tmp_path, *more):
    stats = str(tmp_path / "stats.json")
    code = cli.main(["run", "--bundle", bundle, "--chip", "lsl:" + name, "--hand", "neurohand:" + hand.slave_path,
                     "--backend", "numpy", "--duration", str(seconds), "--stats-json", stats, "--quiet"] + list(more))
    err = capsys.readouterr().err
    assert code == 0, err
    with open(stats) as handle:
        return json.load(handle)


def refused(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- the gap rule (no LSL needed) ------------------------------------------------------

def test_gaps_are_found_from_timestamps_beyond_the_jitter_tolerance():
    rate = 1000.0
    gaps = GapDetector(rate)
    jitter = np.random.RandomState(0).uniform(-0.008, 0.008, size=200)
    found = []
    first = 0
    for k in range(200):
        if k == 100:
            first += 50                           # 50 samples (50 ms) never arrive
        stamp = first / rate + (jitter[k] if k not in (99, 100) else 0.0)
        found.append(gaps.missing_before(stamp, stamp + 9 / rate))
        first += 10
    assert sum(found) == 50 and found[100] == 50 and gaps.counters["gaps"] == 1
    assert gaps.missing_before(0.0, 0.01) == 0 and gaps.counters["timestamp_reversals"] == 1
    gaps.reset()
    assert gaps.missing_before(5.0, 5.01) == 0                  # a new stream starts afresh


def test_a_sample_counter_makes_gaps_exact_and_the_clock_counts_its_wraps():
    rate = 250.0
    gaps = GapDetector(rate, modulus=256)
    index = 0
    found = []
    for skip in (0, 0, 3, 0, 300, 0, 256, 1):
        index += skip
        # Timestamps as BrainFlow's: read in bursts, 28 ms late here and there (more than the tolerance).
        stamp = index / rate + (0.028 if skip == 0 else 0.0)
        found.append(gaps.missing_before(stamp, stamp + 4 / rate, index % 256, (index + 4) % 256))
        index += 5
    assert found == [0, 0, 3, 0, 300, 0, 256, 1]
    assert gaps.counters["gap_samples"] == 560 and gaps.counters["gaps"] == 4


def test_a_chunk_becomes_the_chip_parser_s_events_gap_first():
    from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
    parser = BlockParser()
    samples = np.ones((5, 2), dtype=np.float32)
    first = parser.feed(SampleChunk(samples, 1.0, stream_start=True))
    events = parser.feed(SampleChunk(samples, 1.5, missing_before=7))
    assert [type(e) for e in first] == [SampleFrame] and first[0].stream_start
    assert [type(e) for e in events] == [SampleGap, SampleFrame] and events[0].missing_samples == 7
    assert events[1].samples is samples and events[1].sequence == first[0].sequence + 1
    assert len(SampleChunk(samples, 0.0)) == samples.nbytes
    assert parser.counters["frames_good"] == 2 and parser.counters["gaps"] == 1 and parser.counters["frames_missing"] == 0


# --- out: --lsl-outlet --------------------------------------------------------------

class Consumer(object):
    """Pulls every sample of the stream ``name`` (its own thread) and notes LSL's clock when each one came."""

    def __init__(self, name):
        self.name = name
        self.info = None
        self.samples, self.stamps, self.received = [], [], []
        self.done = threading.Event()
        self.error = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        try:
            found = pylsl.resolve_byprop("name", self.name, 1, 15.0)
            assert found, "stream {} never appeared".format(self.name)
            inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
            self.info = inlet.info(5.0)
            inlet.open_stream(5.0)
            while True:
                # One sample at a time, returning the moment it is there; once told to stop, until none is left.
                sample, stamp = inlet.pull_sample(timeout=0.0 if self.done.is_set() else 0.05)
                if stamp is not None:
                    self.received.append(pylsl.local_clock())
                    self.samples.append(sample)
                    self.stamps.append(stamp)
                elif self.done.is_set():
                    return
        except Exception as exc:  # reported by the test
            self.error = exc

    def stop(self):
        time.sleep(0.2)             # the last samples in flight
        self.done.set()
        self._thread.join(5.0)
        assert self.error is None, self.error

    def delays(self):
        return np.array(self.received) - np.array(self.stamps)


def channels(info):
    result = []
    channel = info.desc().child("channels").child("channel")
    while not channel.empty():
        result.append((channel.child_value("label"), channel.child_value("unit")))
        channel = channel.next_sibling("channel")
    return result


@needs_lsl
def test_replay_publishes_positions_and_signals_stamped_when_their_data_arrived(data, capsys, tmp_path):
    bundle, recording, microvolts, rate = data
    name = stream_name("out")
    consumers = [Consumer(name).start(), Consumer(name + "-signals").start()]
    stats = str(tmp_path / "stats.json")
    try:
        code = cli.main(["replay", bundle, recording, "--realtime", "--seconds", "2.5", "--backend", "numpy", "--json",
                         "--quiet", "--lsl-outlet", name, "--lsl-signals", "--stats-json", stats])
    finally:
        for consumer in consumers:
            consumer.stop()
    assert code == 0, capsys.readouterr().err
    with open(stats) as handle:
        document = json.load(handle)
    positions, signals = consumers

    assert positions.info.type() == "Control" and positions.info.channel_count() == 5
    assert positions.info.nominal_srate() == pytest.approx(50.0)
    assert channels(positions.info) == [(finger, "normalized")
                                        for finger in ("thumb", "index", "middle", "ring", "little")]
    assert signals.info.type() == "ENG" and signals.info.nominal_srate() == pytest.approx(rate)
    assert channels(signals.info) == [("ch{:02d}".format(i), "microvolts") for i in range(4)]

    published = document["lsl_outlet"]
    assert published["push_errors"] == 0 and published["positions_pushed"] >= 80
    values = np.array(positions.samples)
    # A consumer that connects while the run starts gets only what liblsl still holds from before; from
    # then every decoded window's sample, one per 20 ms stride (give or take the chip frames' jitter, and a
    # window the decoder skipped to catch up on a busy machine).
    assert 0.8 * published["positions_pushed"] <= len(values) <= published["positions_pushed"]
    assert np.max(np.diff(positions.stamps)) < 0.05 + 0.02 * document["skips"]
    assert np.all((values >= 0) & (values <= 1)) and values.std(axis=0).min() > 0   # decoded, moving
    # Stamped with the arrival of the data (the runtime's clock, converted once): received a little later
    # (decoding, the hand, LSL: ~2 ms on a quiet machine), never earlier.  The first samples were pushed
    # before the consumer had connected (liblsl hands them over on connection), so the live delay is judged
    # on the second half, with room for a busy machine.
    delay = positions.delays()
    assert delay.min() > -0.0005
    live = delay[len(delay) // 2:]
    assert np.median(live) < 0.02 and np.percentile(live, 90) < 0.1
    assert np.median(np.diff(positions.stamps)) == pytest.approx(0.02, abs=0.002)
    assert abs(published["clock_offset_s"]) < 0.01             # both are CLOCK_MONOTONIC on Linux

    # The raw signals are the recording's samples in microvolts, in order, none lost from the first this
    # consumer got (but the last chunk may still be in flight when the outlet closes).
    got = np.array(signals.samples, dtype=np.float32)
    assert published["signal_samples_pushed"] == document["frames"]["received"] * 20
    first = int(np.flatnonzero(np.all(microvolts == got[0], axis=1))[0])
    assert first < 0.2 * published["signal_samples_pushed"]
    assert published["signal_samples_pushed"] - 40 <= first + len(got) <= published["signal_samples_pushed"]
    assert np.array_equal(got, microvolts[first:first + len(got)])
    signal_delay = signals.delays()
    assert signal_delay.min() > -0.0005 and np.median(signal_delay[len(signal_delay) // 2:]) < 0.02
    assert document["stage_us"]["publish"]["count"] == published["positions_pushed"]


@needs_lsl
def test_outlet_options_are_checked_before_anything_runs(data, capsys):
    bundle, recording, _, _ = data
    assert "--realtime" in refused(capsys, ["replay", bundle, recording, "--lsl-outlet", "x"])
    assert "--lsl-outlet" in refused(capsys, ["replay", bundle, recording, "--realtime", "--lsl-signals"])
    assert "stream name" in refused(capsys, ["replay", bundle, recording, "--realtime", "--lsl-outlet", "a'b"])


# --- in: --chip lsl:NAME ------------------------------------------------------------

@needs_lsl
def test_run_decodes_an_lsl_stream_into_the_hand_and_counts_a_gap(data, capsys, hand, tmp_path):
    bundle, _, microvolts, rate = data
    name = stream_name("in")
    amplifier = Amplifier(name, microvolts, rate, skip_at=4000, skip=100).start()
    try:
        document = run_on_lsl(capsys, bundle, name, hand, 2.5, tmp_path)
    finally:
        amplifier.close()
    link = document["chip_link"]
    assert link["gaps"] == 1 and link["gap_samples"] == 100            # the lost 50 ms, from the timestamps
    assert document["decoder"]["missing_samples"] == 100 and document["decoder"]["gaps"] == 1
    assert 1.8 * rate <= link["samples"] <= amplifier.pushed
    assert link["stream_losses"] == 0 and link["reader_errors"] == 0
    assert document["windows"]["decoded"] >= 70
    assert hand.wait_for(document["commands_sent"], 2.0)
    received = np.array([c.positions for c in hand.received()])
    assert len(received) == document["commands_sent"]
    # Decoded commands reached the hand (not only the safe posture): the fingers moved.
    assert received.std(axis=0).max() > 0.01
    assert document["safety_events"]["by_kind"]["chip_config"] == 0


@needs_lsl
def test_a_stream_in_millivolts_is_decoded_in_microvolts(data, capsys, tmp_path):
    from neurohand.deploy.runtime.queues import BatchQueue
    from neurohand.deploy.runtime.stats import RuntimeStats
    from neurohand.firmware_bridge.chip.parser import ChipParser, SampleFrame
    from neurohand.firmware_bridge.chip.receiver import ChipReceiver
    from neurohand.firmware_bridge.chip.session import ChipSession

    _, _, microvolts, rate = data
    name = stream_name("mv")
    block = microvolts[:400]
    amplifier = Amplifier(name, block / 1000.0, rate, units="millivolts").start()
    frames = BatchQueue(1000)
    receiver = ChipReceiver(ChipParser(), frames, RuntimeStats(), time.perf_counter, sample_rate=rate)
    source = ChipSession("lsl:" + name).open()       # --chip picks the source by its prefix
    try:
        assert type(source).__name__ == "LslSource" and source.chip_config.n_channels == 4
        assert source.chip_config.sample_rate_hz == rate and source.chip_config.scale_uv == 1.0
        source.check(4, rate)
        source.start_streaming(receiver)
        deadline = time.time() + 5.0
        got = []
        while sum(len(g) for g in got) < len(block) and time.time() < deadline:
            items = []
            frames.take_all(items, 0.1)
            got += [event.samples for event, _ in items if isinstance(event, SampleFrame)]
    finally:
        source.close()
        amplifier.close()
    got = np.concatenate(got)
    assert got.shape == block.shape
    assert np.allclose(got, block, rtol=1e-6, atol=1e-3)


@needs_lsl
def test_a_stream_that_does_not_fit_the_bundle_is_refused_in_one_line(data, capsys, hand):
    bundle, _, microvolts, rate = data
    three = stream_name("three")
    amplifier = Amplifier(three, microvolts[:, :3], rate)
    no_unit = stream_name("nounit")
    unitless = Amplifier(no_unit, microvolts, rate, units=None)
    slow = stream_name("slow")
    wrong_rate = Amplifier(slow, microvolts, 500.0)
    base = ["run", "--bundle", bundle, "--hand", "neurohand:" + hand.slave_path, "--backend", "numpy", "--chip"]
    try:
        message = refused(capsys, base + ["lsl:" + three])
        assert "signal source lsl:{} is configured for 3 channels, the decoder needs 4".format(three) in message
        assert "has unit ''" in refused(capsys, base + ["lsl:" + no_unit])
        assert "500.0 Hz, the decoder needs 2000 Hz" in refused(capsys, base + ["lsl:" + slow])
        assert "found by" in refused(capsys, base + ["lsl:colour=red"])
        assert "int16 counts" in refused(capsys, base + ["lsl:" + three, "--record", "x.nhr"])
    finally:
        amplifier.close()
        unitless.close()
        wrong_rate.close()
    assert hand.received() == []                  # nothing ever reached the hand


@needs_lsl
def test_a_stream_that_vanishes_puts_the_hand_safe_and_one_that_returns_is_decoded_again(data, capsys, hand,
                                                                                           tmp_path):
    bundle, _, microvolts, rate = data
    name = stream_name("vanish")
    first = Amplifier(name, microvolts[:int(0.8 * rate)], rate, vanish=True).start()
    second = [None]

    def come_back():
        # The app is restarted half a second after it crashed: same name, same source_id.
        while first.outlet is not None or first.pushed == 0:
            time.sleep(0.01)
        time.sleep(0.5)
        second[0] = Amplifier(name, microvolts[int(1.3 * rate):], rate).start()

    restarter = threading.Thread(target=come_back, daemon=True)
    restarter.start()
    try:
        document = run_on_lsl(capsys, bundle, name, hand, 4.0, tmp_path)
    finally:
        restarter.join(5.0)
        first.close()
        if second[0] is not None:
            second[0].close()
    link = document["chip_link"]
    assert link["stream_losses"] == 1 and link["reconnects"] == 1 and link["link_losses"] == 1
    assert link["stream_restarts"] == 1 and link["restart_gap_samples"] > 0.3 * rate   # the outage, as a gap
    # The loss is said at once (or, on a busy machine, the data timeout came first and said it).
    events = document["safety_events"]["events"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "ready" and kinds[-1] == "shutdown" and "recovered" in kinds, json.dumps([events, link])
    lost = [e for e in events if e["kind"] == "source_lost"]
    assert document["safety_events"]["by_kind"]["source_lost"] == 1 and "lost" in lost[0]["reason"]
    assert kinds.index("source_lost") < len(kinds) - 1 - kinds[::-1].index("recovered")
    assert hand.wait_for(document["commands_sent"], 2.0)
    positions = np.array([c.positions for c in hand.received()])
    # During the outage the hand was held at the safe posture (open: all zero), then moved again.
    assert np.any(np.all(positions == 0.0, axis=1))
    lost_at = lost[0]["time_s"]
    recovered_at = [e["time_s"] for e in events if e["kind"] == "recovered"][-1]
    assert recovered_at - lost_at > 0.4                          # the half second the app was away, at least
    after = positions[np.argmax(np.all(positions == 0.0, axis=1)):]
    assert after.std(axis=0).max() > 0.01                        # and it moved again after that


# --- the service: LSL only where the unit asks for it --------------------------------

def unit_lines(**changes):
    from neurohand.deploy import flash
    values = dict(install_dir="/opt/neurohand", system_root="/", service_user="neurohand", remote_python="python3",
                  chip_port="/dev/neurohand-chip", hand="psyonic:/dev/neurohand-hand", backend="tensorrt",
                  fp16=False, skip_engine=False, max_performance=False, chip_usb=None, hand_usb=None,
                  start_service=True)
    values.update(changes)
    return flash.service_unit(flash.FlashSettings(**values)).splitlines()


def test_the_unit_opens_only_what_lsl_needs_and_only_when_asked():
    from neurohand.firmware_bridge.shared.errors import UsageError
    plain = dict(line.split("=", 1) for line in unit_lines() if "=" in line)
    assert plain["RestrictAddressFamilies"] == "AF_UNIX" and plain["IPAddressDeny"] == "any"
    assert "IPAddressAllow" not in plain

    lines = unit_lines(lsl_allow=("localhost", "192.168.10.0/24"), lsl_outlet="hand-positions",
                       chip_port="lsl:type=EEG")
    unit = dict(line.split("=", 1) for line in lines if "=" in line)
    assert unit["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert unit["IPAddressDeny"] == "any" and unit["IPAddressAllow"].split() == ["localhost", "192.168.10.0/24"]
    assert unit["ExecStart"].split()[4:6] == ["--chip", "lsl:type=EEG"]
    assert unit["ExecStart"].endswith("--lsl-outlet hand-positions")
    assert len(lines) == len(unit_lines()) + 1

    for changes in [dict(chip_port="lsl:MyAmp"), dict(lsl_outlet="x"),
                    dict(lsl_allow=("any",)), dict(lsl_allow=("0.0.0.0/0",)), dict(lsl_allow=("192.168.10.5/24",)),
                    dict(lsl_allow=("localhost\nUser=root",)), dict(lsl_allow=()),
                    dict(lsl_allow=("localhost",), lsl_outlet="a b"),
                    dict(lsl_allow=("localhost",), chip_port="lsl:x y")]:
        with pytest.raises(UsageError) as error:
            unit_lines(**changes)
        assert "\n" not in str(error.value)
