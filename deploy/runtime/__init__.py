"""The real-time decode loop behind ``neurohand run`` and ``neurohand replay``.

Pure stage objects (no threads, injected clocks) do the work; a thin shell
runs them either with threads and serial ports or in process as fast as
possible, so the same decoding code is measured on the bench and runs on the
Jetson (docs/runtime.md)::

    config.py       RuntimeConfig: validated, JSON-loadable settings
    postprocess.py  PostProcessor: calibration, smoothing, slew limit, clamping
    safety.py       SafetySupervisor: faults, safe posture, recovery, event log
    decode.py       DecodeStage: chip events -> DSP/features -> RNN step -> commands
    writer.py       HandWriterStage: keep-alive, watchdog, last check, hand.send
    recorder.py     RecordingSink / ThreadedRecorder: --record
    stats.py        bounded-memory timings, status line, --stats-json document
    assemble.py     build_runtime: the stages wired together (RuntimeParts), the stats document
    queues.py       BatchQueue (reader -> decoder), LatestSlot (decoder -> writer)
    realtime.py     RealtimeRunner: threads, signals, shutdown (run, replay --realtime)
    fast.py         run_fast: the same stages in one thread, virtual clock (replay --fast)
    options.py      argparse options (standard library only)
    signals.py      StopSignals: SIGINT/SIGTERM noted from a command's first moment (standard library only)
    replay_source.py  recording -> (event, time) items for replay --fast
    feature_worker.py  replay --fast on two CPUs: features computed ahead in a child process

Entry points for the CLI: :func:`run_realtime` and :func:`run_fast_replay`.
This module imports numpy only when they are called.
"""
import sys
import time


def run_realtime(pipeline, backend, hand, open_chip, scale_uv, channel_names, config=None,
                 record_path=None, stats_path=None, duration_s=None, quiet=False, metadata=None,
                 install_signals=True, clock=time.perf_counter, signals=None, outlets=None, sent_classes=None):
    """Run the decode loop on live links until SIGINT/SIGTERM or ``duration_s``.

    Parameters
    ----------
    pipeline : FeaturePipeline (normalisation fitted), e.g. from the bundle's config
    backend : decoder backend from ``create_backend``
    hand : hand driver from ``create_hand`` (opened)
    open_chip : callable(receiver) -> link with ``close()``
        Opens the chip port with ``receiver`` (a ChipReceiver: ``data_received``
        / ``feed`` / ``connection_lost``) as the reader's protocol object,
        sends START, and returns the link; ``link.close()`` must send STOP
        (best effort) and close the port.  Replies reach ``receiver.on_reply``.
    scale_uv : sequence of float, µV per ADC count, one per channel
    channel_names : list of str (for the recording)
    config : RuntimeConfig or None (defaults)
    record_path, stats_path : str or None (``--record``, ``--stats-json``)
    duration_s : float or None, stop after this long
    quiet : bool, no status/safety lines on stderr
    metadata : dict for the recording's header (bundle digest, patient, ...)
    install_signals : bool, SIGINT/SIGTERM -> clean shutdown (main thread only)
    signals : StopSignals or None, handlers the caller installed already (at
        the start of its command); used instead of installing new ones, and a
        stop they noted during start-up ends the run at once, cleanly
    outlets : opened LslOutlets or None, also publish there (``--lsl-outlet``,
        see ``build_runtime``); the caller closes them
    sent_classes : list or None, filled with the movement class told with each command sent
        (``build_runtime``; replay --realtime scores a class head with it)

    Returns the stats document (dict).  The hand, the backend and the
    recording are closed on return, whatever happened.
    """
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.runtime.assemble import build_runtime
    from neurohand.deploy.runtime.realtime import RealtimeRunner, installed_signal_handlers
    from neurohand.deploy.runtime.recorder import ThreadedRecorder

    config = RuntimeConfig() if config is None else config
    recorder = None
    try:
        if record_path is not None:
            sink = _open_recording(record_path, pipeline, backend, scale_uv, channel_names, config, metadata)
            backlog = int(config.record_backlog_ms / 1000.0 * pipeline.signal_rate)
            recorder = ThreadedRecorder(sink, max(backlog, 1))
        parts = build_runtime(pipeline, backend, hand, config, scale_uv, clock, catch_up="newest",
                              recorder=recorder, outlets=outlets, sent_classes=sent_classes)
    except BaseException:
        _close_quietly(recorder, hand, backend)
        raise
    runner = RealtimeRunner(parts, open_chip, clock=clock, stats_path=stats_path,
                            status_stream=None if quiet else sys.stderr, warning_stream=sys.stderr)
    if signals is not None:
        signals.attach(runner)
        try:
            return runner.run(duration_s)
        finally:
            signals.detach()
    if not install_signals:
        return runner.run(duration_s)
    with installed_signal_handlers(runner):
        return runner.run(duration_s)


def run_fast_replay(pipeline, backend, items, scale_uv, channel_names=None, config=None, hand=None,
                record_path=None, stats_path=None, metadata=None, on_command=None, stream=None):
    """Decode ``items`` ((event, t_s) pairs, see :mod:`.replay`) as fast as possible.

    The same stages as :func:`run_realtime`, every window decoded
    (``catch_up="all"``), in this thread, with a virtual clock; ``hand``
    defaults to a NullHand that validates every command.  ``on_command``
    (optional) is called with every DecodedCommand (e.g. to score the
    decoder); ``record_path`` keeps them in a recording.  ``stream``: the
    feature stream (None: ``pipeline.stream()``; a FeatureWorker's when its
    items come from that worker).  Returns the stats document.
    """
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.runtime.assemble import build_runtime, write_stats_json
    from neurohand.deploy.runtime.fast import VirtualClock, run_fast

    config = RuntimeConfig() if config is None else config
    if hand is None:
        from neurohand.firmware_bridge.hands import create_hand
        hand = create_hand("none", n_outputs=getattr(backend, "n_positions", backend.n_outputs))
    recorder = None
    try:
        if record_path is not None:
            names = channel_names or ["ch{}".format(i) for i in range(pipeline.n_channels)]
            recorder = _open_recording(record_path, pipeline, backend, scale_uv, names, config, metadata)
        clock = VirtualClock()
        parts = build_runtime(pipeline, backend, hand, config, scale_uv, clock, timer=time.perf_counter,
                              catch_up="all", recorder=recorder, measure_latency=False, stream=stream)
        document = run_fast(parts, items, clock, on_command=on_command)
    finally:
        _close_quietly(recorder, hand, backend)
    if recorder is not None:
        document["recording"] = {"path": record_path}
    if stats_path is not None:
        write_stats_json(stats_path, document)
    return document


def _open_recording(path, pipeline, backend, scale_uv, channel_names, config, metadata):
    from neurohand.deploy.runtime.recorder import open_run_recording
    from neurohand.firmware_bridge.hands.base import finger_names

    info = dict(metadata or {})
    info.setdefault("runtime_config", config.to_dict())
    return open_run_recording(path, pipeline.signal_rate, channel_names, scale_uv, pipeline.stride_samples,
                              list(finger_names(getattr(backend, "n_positions", backend.n_outputs))), metadata=info)


def _close_quietly(*things):
    for thing in things:
        close = getattr(thing, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # already failing; the first error is the one to report
                pass
