"""``serial:PORT``: a glove that speaks neurohand's glove protocol (docs/glove-protocol.md).

The glove streams on its own; the host only listens.  Opening waits for the
glove's hello (sent at power-up and every second) to learn the channel count
and rate, so the wrong device on the port is a clear error instead of silence.
"""
import threading
import time

from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.gloves.base import GloveSample, GloveSource
from neurohand.firmware_bridge.gloves.calibration import default_sensor_fingers
from neurohand.firmware_bridge.gloves.parser import GloveFrame, GloveParser
from neurohand.firmware_bridge.link import LinkProtocol, SerialLink, open_serial_port
from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError

#: How long ``virtual:PORT`` listens for neurohand frames before it takes the
#: glove for a CyberGlove (which is silent until asked).
DETECT_TIMEOUT_S = 1.5


def open_flushed_port(url, baudrate, read_timeout_s, write_timeout_s):
    """``open_serial_port``, then drop whatever the port buffered before we opened it.

    A glove streams whether anyone listens or not; bytes left from before the
    open would all get the same arrival time, misplacing them on the timeline.
    """
    port = open_serial_port(url, baudrate, read_timeout_s, write_timeout_s)
    try:
        port.reset_input_buffer()
    except (OSError, AttributeError):    # loop:// and friends have no kernel buffer to flush
        pass
    return port


def stall_timeout_for(rate_hz):
    """Silence after which a glove of ``rate_hz`` counts as stopped: 10 periods, at least 0.25 s."""
    return max(0.25, 10.0 / float(rate_hz))


class _Receiver(LinkProtocol):
    """The link's protocol object: parse, stamp with the arrival time, hand on."""

    def __init__(self, parser, on_samples, on_hello):
        self.parser = parser
        self.on_samples = on_samples
        self.on_hello = on_hello
        self.bytes_seen = 0

    def data_received(self, data):
        arrival = time.monotonic()
        self.bytes_seen += len(data)
        samples = []
        for event in self.parser.feed(data):
            if type(event) is GloveFrame:
                samples.append(GloveSample(arrival, event.sequence, tuple(float(v) for v in event.values)))
            else:
                self.on_hello(event)
        if samples:
            self.on_samples(samples)

    def connection_lost(self, exc):
        self.parser.flush()


class SerialGloveSource(GloveSource):
    """A neurohand-protocol glove on ``port``, open and streaming.

    Parameters
    ----------
    port : str, device path
    baudrate : int (a USB CDC-ACM glove ignores it)
    hello_timeout_s : float, how long to wait for the hello when opening
    stall_timeout_s : float or None (default: :func:`stall_timeout_for` the rate)

    Raises LinkError (port missing, or silent) or ProtocolError (bytes, but no
    neurohand glove frame: the wrong device, or the wrong baud rate).
    Attributes beyond GloveSource's: ``hello`` (GloveHello), ``sensor_fingers``
    (the default map, one sensor per finger), ``adc_bits``.
    """

    kind = "serial"

    def __init__(self, port, baudrate=gp.BAUDRATE, hello_timeout_s=gp.HELLO_TIMEOUT_S, stall_timeout_s=None):
        super(SerialGloveSource, self).__init__(port)
        self.parser = GloveParser()
        self.hello = None
        self._hello_seen = threading.Event()
        self._receiver = _Receiver(self.parser, self._push, self._on_hello)
        self.link = SerialLink(port, self._receiver, baudrate=baudrate, open_port=open_flushed_port)
        try:
            self.link.open()
        except LinkError as exc:
            raise LinkError("glove at {}: {}".format(port, exc)) from exc
        try:
            self._wait_for_hello(hello_timeout_s)
        except BaseException:
            self.close()
            raise
        hello = self.hello
        self.sensor_names = ["flex{}".format(i) for i in range(hello.n_channels)]
        self.rate_hz = float(hello.rate_hz)
        self.adc_bits = hello.adc_bits
        self.sensor_fingers = default_sensor_fingers(self.kind, hello.n_channels)
        self.stall_timeout_s = stall_timeout_for(self.rate_hz) if stall_timeout_s is None else stall_timeout_s
        self._started()

    def _on_hello(self, hello):
        self.hello = hello
        self._hello_seen.set()

    def _wait_for_hello(self, timeout_s):
        if self._hello_seen.wait(timeout_s):
            return
        counters = self.parser.counters
        seen = self._receiver.bytes_seen
        if seen == 0:
            raise LinkError("glove at {} sent nothing within {:g} s: is it powered, and running a neurohand "
                            "glove sketch (docs/glove-protocol.md)?".format(self.port, timeout_s))
        if counters["frames"]:
            raise ProtocolError("glove at {} sends data frames but no hello within {:g} s; its firmware must "
                                "send a hello every second (docs/glove-protocol.md)".format(self.port, timeout_s))
        raise ProtocolError("device at {} is not a neurohand serial glove: {} bytes in {:g} s, none of them a "
                            "glove frame (another device, or another baud rate; a CyberGlove is "
                            "cyberglove:PORT)".format(self.port, seen, timeout_s))

    def _extra_counters(self):
        return dict(self.parser.counters)


class _Sniffer(LinkProtocol):
    def __init__(self):
        self.parser = GloveParser()
        self.found = threading.Event()

    def data_received(self, data):
        if self.parser.feed(data):
            self.found.set()


def detect_protocol(port, detect_timeout_s=DETECT_TIMEOUT_S):
    """"serial" if neurohand glove frames arrive on ``port`` within the timeout, else "cyberglove".

    A CyberGlove never talks unasked, so silence (or bytes that are no frame)
    leaves the CyberGlove to prove itself when opened.
    """
    sniffer = _Sniffer()
    link = SerialLink(port, sniffer, baudrate=gp.BAUDRATE, open_port=open_flushed_port)
    try:
        link.open()
    except LinkError as exc:
        raise LinkError("glove at {}: {}".format(port, exc)) from exc
    try:
        found = sniffer.found.wait(detect_timeout_s)
    finally:
        link.close()
    return "serial" if found else "cyberglove"
