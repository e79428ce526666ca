"""``lsl:NAME``: a hand tracker or commercial glove that publishes Lab Streaming Layer.

Specs: ``lsl:NAME`` (the stream's name), ``lsl:name=NAME``, ``lsl:type=Glove``,
``lsl:source_id=ID``.  Opening resolves the stream (within
:data:`~neurohand.firmware_bridge.streams.lsl_inlet.RESOLVE_TIMEOUT_S`; a
stream not found is one line listing the streams that are visible), takes
the sensor names from its channel labels and the rate from its nominal rate,
and refuses a non-numeric stream.

A sample's ``arrival`` is its LSL timestamp (liblsl's, corrected to this
machine's clock, not dejittered) converted to ``time.monotonic()`` with the
offset :func:`~neurohand.firmware_bridge.streams.lsl_outlet.measure_offset`
measures once: collect places the sample where it was measured, not where
it was pulled.  There is no sequence number (``sequence`` is None); samples
lost on the way are counted (``lost``) from gaps in the timestamps, by the
signal sources' :class:`~neurohand.firmware_bridge.streams.source.GapDetector`.
pylsl is imported only in :meth:`LslGloveSource.__init__`.
"""
import threading
import time

import numpy as np

from neurohand.firmware_bridge.gloves.base import GloveSample, GloveSource
from neurohand.firmware_bridge.gloves.serial_glove import stall_timeout_for
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, UsageError
from neurohand.firmware_bridge.streams import lsl_inlet
from neurohand.firmware_bridge.streams.lsl_outlet import check_stream_name, measure_offset
from neurohand.firmware_bridge.streams.source import JOIN_TIMEOUT_S, READER_WAKE_S, GapDetector

#: How long a stream not found is followed by a look at what is there (seconds).
LIST_WAIT_S = 1.0


def parse_lsl_glove(query):
    """``NAME`` / ``PROPERTY=VALUE`` (the part after ``lsl:``) -> (property, value); UsageError otherwise."""
    prop, equals, value = query.partition("=")
    if not equals:
        prop, value = "name", query
    if prop not in lsl_inlet.QUERY_PROPERTIES:
        raise UsageError("glove lsl:{}: an LSL stream is found by {} (lsl:NAME, lsl:type=Glove), not by {!r}".format(
            query, ", ".join(lsl_inlet.QUERY_PROPERTIES), prop))
    check_stream_name("glove lsl:{} ({})".format(query, prop), value)
    return prop, value


class LslGloveSource(GloveSource):
    """An LSL stream as a glove; see the module docstring.  Opens on construction, as the serial sources do."""

    kind = "lsl"

    def __init__(self, query, resolve_timeout_s=None, clock=time.monotonic):
        super(LslGloveSource, self).__init__("lsl:" + query)
        self.query = parse_lsl_glove(query)
        timeout_s = lsl_inlet.RESOLVE_TIMEOUT_S if resolve_timeout_s is None else float(resolve_timeout_s)
        self._clock = clock
        self._counters["stream_losses"] = 0
        try:
            import pylsl
        except ImportError as exc:   # also raised when pylsl is there but liblsl is not
            raise UsageError("glove lsl:... needs pylsl and liblsl (pip install 'neurohand[lab]'; on a Jetson see "
                             "docs/lab-streams.md): {}".format(exc)) from None
        self._pylsl = pylsl
        self._lost_error = lsl_inlet._lost_error(pylsl)
        infos = list(pylsl.resolve_byprop(self.query[0], self.query[1], 1, timeout_s))
        if not infos:
            raise LinkError("glove {}: no LSL stream with {} {!r} found within {:g} s; visible: {}".format(
                self.port, self.query[0], self.query[1], timeout_s, _visible(pylsl)))
        self._inlet = pylsl.StreamInlet(infos[0], max_buflen=lsl_inlet.INLET_BUFFER_S, max_chunklen=0,
                                        recover=False, processing_flags=pylsl.proc_clocksync)
        try:
            info = self._inlet.info(timeout_s)
            self._dtype = self._read_config(info)
            self._inlet.open_stream(timeout_s)
        except BaseException as exc:
            self._inlet.close_stream()
            if isinstance(exc, Exception) and not isinstance(exc, (ConfigError, UsageError, LinkError)):
                raise LinkError("glove {}: {}".format(self.port, exc)) from exc
            raise
        self.stream_info = info
        self.offset_s = measure_offset(pylsl.local_clock, clock)
        self._gaps = GapDetector(self.rate_hz) if self.rate_hz else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="lsl-glove", daemon=True)
        self._started()
        self._thread.start()

    def _read_config(self, info):
        where = "glove {} (LSL stream {!r})".format(self.port, info.name())
        fmt = lsl_inlet._format_name(self._pylsl, info.channel_format())
        if fmt not in lsl_inlet.NUMERIC_FORMATS:
            raise ConfigError("{} sends {} samples; a glove needs numeric ones ({})".format(
                where, fmt, ", ".join(sorted(lsl_inlet.NUMERIC_FORMATS))))
        if info.channel_count() < 1:
            raise ConfigError("{} has no channels".format(where))
        labels, _ = lsl_inlet.read_channels(info)
        self.sensor_names = [label or "ch{}".format(i) for i, label in enumerate(labels)]
        rate = info.nominal_srate()
        # An irregular stream (rate 0) has no gaps to find; its stall limit is the slowest glove's.
        self.rate_hz = float(rate) if rate > 0 else None
        self.stall_timeout_s = stall_timeout_for(self.rate_hz or 10.0)
        return lsl_inlet.NUMERIC_FORMATS[fmt]

    def _read_loop(self):
        inlet = self._inlet
        while not self._stop.is_set():
            try:
                # Wait for one sample, then take all that are there (liblsl's pull with a timeout waits
                # for a full chunk): a sample is queued as soon as it came.
                chunk, stamps = inlet.pull_chunk(timeout=READER_WAKE_S, max_samples=1)
                if stamps:
                    more, more_stamps = inlet.pull_chunk(timeout=0.0, max_samples=lsl_inlet.MAX_CHUNK_SAMPLES)
                    chunk, stamps = list(chunk) + list(more), list(stamps) + list(more_stamps)
            except self._lost_error:
                # The outlet is gone: the source goes silent, and collect's stall rules end the session.
                self._counters["stream_losses"] += 1
                return
            except Exception:  # closing under a pull; nothing more will come
                return
            if not stamps:
                continue
            values = np.asarray(chunk, dtype=np.float64).reshape(len(stamps), -1)
            if self._gaps is not None:
                # Sample by sample: a glove's rate is low, and a gap inside a chunk counts too.
                for stamp in stamps:
                    self._counters["lost"] += self._gaps.missing_before(stamp, stamp)
            offset = self.offset_s
            samples = [GloveSample(stamp - offset, None, tuple(float(v) for v in row))
                       for stamp, row in zip(stamps, values)]
            self._counters["frames"] += len(samples)
            self._push(samples)

    def _before_close(self):
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
        inlet, self._inlet = self._inlet, None
        lsl_inlet.close_inlet(inlet)


def _visible(pylsl):
    """The LSL streams this machine sees now, one phrase (names and types)."""
    try:
        infos = lsl_inlet._unique(pylsl.resolve_streams(LIST_WAIT_S))
    except Exception as exc:  # the listing only helps the error message
        return "unknown ({})".format(exc)
    if not infos:
        return "none (is the glove's app streaming? docs/lab-streams.md)"
    return ", ".join(sorted("{} (type {})".format(i.name(), i.type() or "?") for i in infos))
