"""Through real pseudo-terminals: virtual chip -> SerialLink (pyserial) -> ChipParser,
at the real data rate, with injected faults, accelerated pacing, and an
unplug/replug that the link survives."""
import os
import threading
import time

import numpy as np
import pytest

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipParser, ChipReply, SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.errors import LinkError
from neurohand.firmware_bridge.link import LinkProtocol, SerialLink, allow_url_schemes
from neurohand.firmware_bridge.virtual.chip import ArraySource, FaultInjector, VirtualChip

from timing import wait_until


class ChipHost(LinkProtocol):
    """What the runtime does: parse, route replies to the command channel, keep data events."""

    def __init__(self):
        self.parser = ChipParser()
        self.events = []
        self.channel = None
        self.made = 0
        self.lost = []
        self.arrivals = []          # (monotonic time, samples per channel) per frame
        self.bytes_parsed = 0       # bytes received and handled (events appended)

    def connection_made(self, link):
        self.made += 1

    def data_received(self, data):
        now = time.monotonic()
        for event in self.parser.feed(data):
            if isinstance(event, ChipReply):
                self.channel.handle_reply(event)
            else:
                self.events.append(event)
                if isinstance(event, SampleFrame):
                    self.arrivals.append((now, event.samples.shape[0]))
        self.bytes_parsed += len(data)

    def connection_lost(self, exc):
        self.lost.append(exc)
        self.parser.flush()

    def frames(self):
        return [e for e in self.events if isinstance(e, SampleFrame)]


class RunningChip:
    def __init__(self, chip):
        self.chip = chip
        self.stop = threading.Event()
        self.path = chip.open()
        self.thread = threading.Thread(target=chip.serve, args=(self.stop,))
        self.thread.start()

    def finish(self, timeout=10.0):
        self.thread.join(timeout)
        self.stop.set()
        self.thread.join(2.0)
        assert not self.thread.is_alive()
        self.chip.close()


def source(seconds, rate=10000, n_channels=16, seed=0):
    rng = np.random.RandomState(seed)
    samples = rng.randint(-16383, 16384, (int(seconds * rate), n_channels)).astype(np.int16)
    return ArraySource(samples, rate, scale_uv=0.195)


def connect(path, host, **kwargs):
    link = SerialLink(path, host, **kwargs).open()
    host.channel = cp.ChipCommandChannel(link.write, timeout_s=1.0)
    return link



def drain(host, chip, timeout_s=5.0):
    """After the chip finished: wait until the host handled every byte the chip wrote."""
    assert wait_until(lambda: host.bytes_parsed == chip.bytes_written, timeout_s), \
        (host.bytes_parsed, chip.bytes_written)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_one_second_at_the_real_rate_loses_nothing():
    fds_before = open_fds()
    src = source(1.0)
    running = RunningChip(VirtualChip(src))
    host = ChipHost()
    link = connect(running.path, host)
    assert host.channel.identify().model == "NH-VIRTUAL"
    assert host.channel.get_config() == cp.ChipConfig(16, 20, 10000, False, pytest.approx(0.195))
    host.channel.start_streaming()
    running.finish()
    drain(host, running.chip)
    link.close()
    frames = host.frames()
    assert len(frames) == 500 and host.events == frames          # no gaps
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), src.samples)
    assert [f.sequence for f in frames] == list(range(500))
    c = host.parser.counters
    assert (c["frames_good"], c["crc_errors"], c["resyncs"], c["bytes_discarded"], c["frames_missing"]) == (500, 0, 0, 0, 0)
    assert not link.running and open_fds() == fds_before


def test_injected_faults_are_counted_exactly_by_the_parser():
    src = source(0.5, seed=1)
    faults = FaultInjector(drop_rate=0.02, corrupt_rate=0.02, garbage_probability=0.05, garbage_max_bytes=80, seed=7)
    running = RunningChip(VirtualChip(src, speed=2.0, faults=faults))
    host = ChipHost()
    link = connect(running.path, host)
    host.channel.start_streaming()
    running.finish()
    drain(host, running.chip)
    link.close()
    host.parser.flush()
    injected, c = faults.counters, host.parser.counters
    assert injected["frames_dropped"] and injected["frames_corrupted"] and injected["garbage_bursts"]
    assert c["frames_good"] == 250 - injected["frames_dropped"] - injected["frames_corrupted"]
    assert c["crc_errors"] == injected["frames_corrupted"]
    assert c["bytes_discarded"] == injected["expected_bytes_discarded"]
    assert c["resyncs"] == injected["expected_resyncs"]
    assert c["frames_missing"] == injected["expected_frames_missing"]
    # Every intact frame carries exactly the source's samples at its sequence number.
    for frame in host.frames():
        np.testing.assert_array_equal(frame.samples, src.samples[frame.sequence * 20:(frame.sequence + 1) * 20])


def test_accelerated_pacing_delivers_the_nominal_rate():
    speed = 10.0
    src = source(6.0, rate=10000, n_channels=4, seed=2)
    running = RunningChip(VirtualChip(src, speed=speed, autostart=True))
    host = ChipHost()
    link = connect(running.path, host)
    assert wait_until(lambda: len(host.arrivals) > 2)
    start = time.monotonic()
    running.finish()            # the 0.6 s stream runs to its end: the window is its remaining ~0.6 s
    link.close()
    arrivals = [a for a in host.arrivals if a[0] >= start]
    elapsed = arrivals[-1][0] - arrivals[0][0]
    delivered = sum(n for _, n in arrivals[1:])
    rate = delivered / elapsed
    # Wall-clock on a shared machine: generous bound; drift-freedom itself is
    # proven exactly by the scheduler test with an injected clock.
    assert rate == pytest.approx(10000 * speed, rel=0.05)


def test_unplug_and_replug_is_survived_and_reported(tmp_path):
    fds_before = open_fds()
    src = source(3.0, n_channels=4, seed=3)
    port = str(tmp_path / "chip")
    paths = []
    # A self-powered chip (it keeps streaming across the unplug): the link alone must
    # count what was lost.  A chip that resets is re-started by the runtime (test_reconnect.py).
    chip = VirtualChip(src, speed=1.0, disconnect_after_s=0.5, reconnect_pause_s=0.3, link_path=port,
                       on_port=paths.append, reset_on_unplug=False)
    running = RunningChip(chip)
    host = ChipHost()
    link = connect(port, host, backoff_initial_s=0.02, backoff_max_s=0.1)
    host.channel.start_streaming()
    assert wait_until(lambda: link.counters["reconnects"] == 1)
    assert wait_until(lambda: any(isinstance(e, SampleGap) for e in host.events))

    def frames_after_the_gap():
        events = list(host.events)
        gap = next(i for i, e in enumerate(events) if isinstance(e, SampleGap))
        return sum(isinstance(e, SampleFrame) for e in events[gap:])

    assert wait_until(lambda: frames_after_the_gap() >= 100)    # streaming normally again
    link.close()                  # before the chip goes, or its closing would be a second unplug
    running.stop.set()
    running.finish()
    assert len(paths) == 2                     # printed again after the replug (the number may be reused)
    assert link.counters["disconnects"] == 1 and link.counters["reconnects"] == 1 and host.made == 2
    assert len(host.lost) == 2 and host.lost[0] is not None and host.lost[1] is None   # failure, then close()
    # 0.3 s at 500 frames/s on the chip's clock (however late its loop noticed the replug).
    assert chip.counters["disconnects"] == 1 and chip.counters["frames_lost_unplugged"] >= 0.3 * 500 - 2
    c = host.parser.counters
    frames = host.frames()
    # Sequence bookkeeping is exact: every sequence number is either received or reported missing.
    assert c["frames_good"] + c["frames_missing"] == frames[-1].sequence - frames[0].sequence + 1
    assert c["frames_missing"] >= chip.counters["frames_lost_unplugged"] and c["gaps"] == 1
    for frame in frames:
        np.testing.assert_array_equal(frame.samples, src.samples[frame.sequence * 20:(frame.sequence + 1) * 20, :4])
    assert not os.path.lexists(port)
    assert open_fds() == fds_before


def test_loop_url_and_write_errors():
    host = ChipHost()
    with allow_url_schemes("loop"):       # tests only: no command line can allow a URL port
        link = SerialLink("loop://", host).open()
    frame = cp.encode_data_frame(0, 0, np.ones((20, 16), np.int16))
    link.write(frame)
    assert wait_until(lambda: len(host.frames()) == 1)
    link.close()
    with pytest.raises(LinkError, match="not connected"):
        link.write(frame)
    assert link.counters["bytes_written"] == len(frame) == link.counters["bytes_read"]


def test_missing_port_fails_loudly_unless_waiting(tmp_path):
    import serial
    path = str(tmp_path / "nothing")
    with pytest.raises(LinkError, match="cannot open serial port .*nothing"):
        SerialLink(path, LinkProtocol()).open()
    attempts = []

    def open_port(url, baudrate, read_timeout_s, write_timeout_s):
        attempts.append(time.monotonic())
        return serial.serial_for_url(url, baudrate=baudrate, timeout=read_timeout_s, write_timeout=write_timeout_s)

    link = SerialLink(path, LinkProtocol(), backoff_initial_s=0.01, backoff_max_s=0.04,
                      open_port=open_port).open(wait=True)
    try:
        # Backoff is bounded: 14 attempts at <= 0.04 s per wait take ~0.5 s; doubling without
        # the bound would take 0.01 * (2 ** 12 - 1) = 41 s.  Not 1 attempt: it keeps trying.
        assert wait_until(lambda: len(attempts) >= 14, timeout_s=5.0)
    finally:
        link.close()
    assert link.counters["open_failures"] == len(attempts)
    # Not 100s either: after open()'s failure the thread tries at once, then waits 0.01 s,
    # doubling up to 0.04 s, between attempts (a loaded machine only makes waits longer).
    gaps = [later - earlier for earlier, later in zip(attempts[1:], attempts[2:])]
    for i, gap in enumerate(gaps):
        assert gap >= 0.8 * min(0.01 * 2 ** i, 0.04), (i, gaps)
    assert not link.running


def test_a_protocol_bug_stops_the_thread_and_is_kept():
    class Broken(LinkProtocol):
        def data_received(self, data):
            raise ValueError("bug in consumer")

    with allow_url_schemes("loop"):
        link = SerialLink("loop://", Broken()).open()
    link.write(b"x")
    assert wait_until(lambda: not link.running)
    assert isinstance(link.error, ValueError)
    link.close()


def write_recording(path, samples, rate, dtype="int16", scale_uv=None):
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    names = ["ch{}".format(i) for i in range(samples.shape[1])]
    with RecordingWriter(path, rate, names, dtype=dtype, scale_uv=scale_uv) as writer:
        writer.append_signals(samples)


def test_cli_streams_a_recording_file_with_seeded_faults(tmp_path):
    import json
    import subprocess
    import sys
    rng = np.random.RandomState(4)
    samples = rng.randint(-3000, 3000, (8000, 6)).astype(np.int16)
    recording = str(tmp_path / "rec.nhr")
    write_recording(recording, samples, 10000.0, scale_uv=[0.195] * 6)
    port = str(tmp_path / "chip")
    process = subprocess.Popen(
        [sys.executable, "-m", "neurohand.deploy", "virtual-chip", recording, "--port", port, "--speed", "2",
         "--start", "0.1", "--drop-rate", "0.02", "--corrupt-rate", "0.02", "--garbage-bursts", "20",
         "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        slave = process.stdout.readline().strip()
        assert slave.startswith("/dev/") and os.path.realpath(port) == slave
        host = ChipHost()
        link = connect(port, host)
        assert host.channel.get_config() == cp.ChipConfig(6, 20, 10000, False, pytest.approx(0.195))
        host.channel.start_streaming()
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    link.close()
    assert process.returncode == 0, stderr
    summary = json.loads(stderr.strip().splitlines()[-1])
    faults, chip, c = summary["faults"], summary["chip"], host.parser.counters
    assert chip["frames_sent"] == 350                 # (8000 - 1000) samples / 20
    assert faults["frames_dropped"] and faults["frames_corrupted"] and faults["garbage_bursts"]
    assert c["frames_good"] == 350 - faults["frames_dropped"] - faults["frames_corrupted"]
    assert c["crc_errors"] == faults["frames_corrupted"]
    assert c["bytes_discarded"] == faults["expected_bytes_discarded"]
    assert c["resyncs"] == faults["expected_resyncs"]
    assert c["frames_missing"] == faults["expected_frames_missing"]
    for frame in host.frames():
        start = 1000 + frame.sequence * 20
        np.testing.assert_array_equal(frame.samples, samples[start:start + 20])


def test_write_timeout_is_reported_not_hung():
    master, slave = os.openpty()         # nobody reads the master: the terminal's buffer fills up
    try:
        import tty
        tty.setraw(slave)
        link = SerialLink(os.ttyname(slave), LinkProtocol(), write_timeout_s=0.2).open()
        try:
            with pytest.raises(LinkError, match="timed out after 0.2 s"):
                for _ in range(64):
                    link.write(b"\x00" * 65536)
            assert link.counters["write_timeouts"] == 1
        finally:
            link.close()
    finally:
        os.close(master)
        os.close(slave)


def test_a_small_write_is_one_os_write_not_pyserials_write_and_select(monkeypatch):
    import serial.serialposix
    import tty

    calls = []
    pyserial_write = serial.serialposix.Serial.write
    monkeypatch.setattr(serial.serialposix.Serial, "write",
                        lambda self, data: calls.append(len(data)) or pyserial_write(self, data))
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        tty.setraw(master)
        link = SerialLink(os.ttyname(slave), LinkProtocol()).open()
        try:
            frames = [bytes([index]) * 24 for index in range(50)]
            for frame in frames:
                link.write(frame)
            received = b""
            while len(received) < 24 * 50:
                received += os.read(master, 4096)
            assert received == b"".join(frames)
            assert calls == []          # none went through pyserial's write (os.write, then select)
            assert link.counters["bytes_written"] == 24 * 50
        finally:
            link.close()
    finally:
        os.close(master)
        os.close(slave)


def test_cli_stops_cleanly_on_sigterm_and_prints_counters(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    recording = str(tmp_path / "rec.nhr")
    write_recording(recording, np.zeros((2000, 2), np.int16), 10000.0, scale_uv=[1.0, 1.0])
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "virtual-chip", recording, "--loop",
                                "--autostart"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
    host = ChipHost()
    link = None
    try:
        slave = process.stdout.readline().strip()
        assert slave.startswith("/dev/")
        link = connect(slave, host)
        # 0.2 s of recording is 100 frames: frame 100 is the first of the second pass.
        assert wait_until(lambda: any(f.sequence >= 100 for f in host.frames()), timeout_s=10.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if link is not None:
            link.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    summary = json.loads(stderr.strip().splitlines()[-1])
    assert summary["chip"]["loops"] >= 1          # 0.2 s of recording, looped


def test_a_chunk_that_wakes_the_reader_reaches_the_protocol_whole():
    import tty

    class Chunks(LinkProtocol):
        def __init__(self):
            self.sizes = []

        def data_received(self, data):
            self.sizes.append(len(data))

    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        tty.setraw(master)
        protocol = Chunks()
        link = SerialLink(os.ttyname(slave), protocol).open()
        try:
            for index in range(10):
                time.sleep(0.01)            # the reader is asleep waiting for the next byte
                os.write(master, bytes([index]) * 100)
            wait_until(lambda: sum(protocol.sizes) == 1000, 5.0)
            assert protocol.sizes == [100] * 10       # not its first byte, then the other 99
        finally:
            link.close()
    finally:
        os.close(master)
        os.close(slave)
