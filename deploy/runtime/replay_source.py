"""A recording as the stream of chip events the decode stage eats (fast replay).

``missing`` events of the recording (zeros standing in for samples that never
arrived, docs/recording-format.md) become ``SampleGap`` events again, so the
decoder treats them exactly as it treats a gap on the live link.  Each item
is ``(event, t_s)`` with ``t_s`` the virtual arrival time: the time just
after the event's last sample, relative to the first sample.
"""
import numpy as np

from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.checks import check_int
from neurohand.firmware_bridge.shared.errors import RecordingError
from neurohand.firmware_bridge.shared.outputs import describe_os_error


def recording_gaps(recording):
    """Sorted, merged ``[(first_sample, n_missing)]`` from the recording's ``missing`` events."""
    gaps = []
    for event in recording.events:
        if event.kind == "missing" and event.value > 0:
            first, n = int(event.sample), int(event.value)
            if gaps and first <= gaps[-1][0] + gaps[-1][1]:
                end = max(gaps[-1][0] + gaps[-1][1], first + n)
                gaps[-1] = (gaps[-1][0], end - gaps[-1][0])
            else:
                gaps.append((first, n))
    return gaps


def recording_items(recording, block_samples, start=0, stop=None):
    """Yield ``(SampleFrame | SampleGap, t_s)`` covering samples [start, stop).

    Parameters
    ----------
    recording : Recording (firmware_bridge.recording.open_recording)
    block_samples : int
        Samples per SampleFrame.  Fast replay is quickest with large blocks
        (e.g. 0.1 s); the decoded windows are the same for any block size.
    start, stop : sample range (default: everything)

    Frames carry the stored samples: int16 counts (scale with
    ``recording.scale_uv``) or float32 microvolts (scale 1).
    """
    block_samples = check_int("block_samples", block_samples, minimum=1)
    stop = recording.n_samples if stop is None else stop
    rate = float(recording.signal_rate)
    sequence = 0
    position = start
    gaps = [(first, n) for first, n in recording_gaps(recording) if first + n > start and first < stop]
    for first, n in gaps + [(stop, 0)]:
        first = max(first, position)
        while position < first:
            end = min(position + block_samples, first)
            try:
                samples = np.ascontiguousarray(recording.read_signals(position, end))
            except OSError as exc:   # a failing card or disk (EIO): the recording, not a bug
                raise RecordingError("cannot read recording {!r} at sample {}: {}".format(
                    getattr(recording, "path", "?"), position, describe_os_error(exc))) from None
            yield SampleFrame(sequence, int(round(position * 1e6 / rate)), samples), (end - start) / rate
            sequence += 1
            position = end
        gap_end = min(first + n, stop) if n else first
        if gap_end > position:
            missing = gap_end - position
            missing_frames = -(-missing // block_samples)
            yield SampleGap(sequence, missing_frames, missing), (gap_end - start) / rate
            sequence += missing_frames
            position = gap_end
