"""The pieces of a run built from a bundle, shared by ``neurohand run`` and ``replay``.

    decoder = load_decoder("my-bundle", "auto")     # verified bundle, pipeline, opened backend
    document = run_on_chip(decoder, "/dev/neurohand-chip", hand, config, ...)

The chip's µV scale.  A bundle's config does not hold the scale of the
recording it was trained on, and need not: the feature pipeline works in
microvolts, so what matters is the scale of the counts *this* chip sends.
The chip reports it (one float32 ``scale_uv`` for every channel, GET_CONFIG,
docs/chip-protocol.md): :func:`run_on_chip` opens the chip once
(:class:`~neurohand.firmware_bridge.chip.session.ChipSession`), reads the
configuration, checks the channel count and the rate, builds the run with
that scale and streams on the same connection; after a reconnect the chip's
configuration, scale included, is checked again before it is decoded.
"""
from neurohand.firmware_bridge.shared.errors import BundleError


class Decoder(object):
    """A verified bundle with its feature pipeline and an opened backend.

    Attributes: bundle (deploy.bundle.Bundle), pipeline (FeaturePipeline with
    normalisation), backend (``n_features``, ``n_outputs``, ``step``, ``close``),
    channel_names (list of str), label_names (list of str, one per finger position),
    class_names (tuple of str, the movement classes of a class head, () without one).
    """

    def __init__(self, bundle, pipeline, backend):
        self.bundle = bundle
        self.pipeline = pipeline
        self.backend = backend
        names = bundle.config.get("channel_names")
        if not isinstance(names, list) or len(names) != pipeline.n_channels:
            names = ["ch{:02d}".format(i) for i in range(pipeline.n_channels)]
        self.channel_names = [str(name) for name in names]
        labels = bundle.config.get("labels") or {}
        label_names = labels.get("names") if isinstance(labels, dict) else None
        n_positions = positions_of(backend)
        if not isinstance(label_names, list) or len(label_names) != n_positions:
            label_names = ["out{}".format(i) for i in range(n_positions)]
        self.label_names = [str(name) for name in label_names]
        self.class_names = tuple(getattr(backend, "class_names", ()) or ())

    def metadata(self):
        """What a recording of this run should say about the decoder."""
        return {"bundle": self.bundle.path, "bundle_digest": self.bundle.digest, "backend": self.backend.name}

    def close(self):
        self.backend.close()


def load_decoder(bundle_path, backend_name="auto"):
    """Load and verify BUNDLE, rebuild its feature pipeline, open the backend.

    Raises BundleError/ConfigError (one line) for a bad bundle or a pipeline
    whose feature count does not match the model's inputs.
    """
    from neurohand.decoder.pipeline import FeaturePipeline
    from neurohand.deploy.bundle import load_bundle, open_bundle_backend

    bundle = load_bundle(bundle_path)
    pipeline_config = bundle.config.get("pipeline")
    if not isinstance(pipeline_config, dict):
        raise BundleError("bundle {!r} has no feature pipeline in its config.json".format(bundle.path))
    pipeline = FeaturePipeline.from_config(pipeline_config, where="bundle {} config.json pipeline".format(bundle.path))
    if pipeline.normalisation is None:
        raise BundleError("bundle {!r}: the feature pipeline has no normalisation (not from a training run)".format(
            bundle.path))
    backend, _ = open_bundle_backend(bundle, backend_name)
    if int(backend.n_features) != int(pipeline.n_features):
        backend.close()
        raise BundleError("bundle {!r}: the model takes {} features but its feature pipeline makes {}".format(
            bundle.path, backend.n_features, pipeline.n_features))
    return Decoder(bundle, pipeline, backend)


def run_on_chip(decoder, chip_url, hand_spec, config, record_path=None, stats_path=None, duration_s=None,
                quiet=False, install_signals=True, metadata=None, baudrate=None, announce=None, signals=None,
                outlets=None, sent_classes=None):
    """Decode the chip at ``chip_url`` into the hand ``hand_spec`` until stopped; return the stats document.

    Reads the chip's configuration first (scale, channels, rate) and refuses a
    chip configured differently from the bundle before the hand is opened.
    ``hand_spec`` is a ``create_hand`` specification (``psyonic:PORT``,
    ``neurohand:PORT``, ``keys:MAPFILE``, ``none``).  The hand and the backend
    are closed on return, whatever happened (the hand after its safe posture).
    ``announce(chip_config)``, if given, is called once the chip and the hand
    have been checked and opened, right before decoding starts.
    ``signals`` (a StopSignals the command installed first, or None): a stop
    noted before the hand is opened ends here with StoppedDuringStartup; one
    noted later ends the run at once through its shutdown (safe posture,
    recording closed complete).
    ``outlets`` (opened LslOutlets or None): where the run also publishes
    (``--lsl-outlet``); the caller opened them and closes them.
    ``sent_classes`` (a list or None): filled with the movement class told with
    each command the hand was sent (``build_runtime``).
    """
    from neurohand.deploy.runtime import run_realtime
    from neurohand.firmware_bridge.chip.protocol import BAUDRATE
    from neurohand.firmware_bridge.chip.session import ChipSession, check_chip_config, chip_scale_uv
    from neurohand.firmware_bridge.hands import create_hand

    pipeline = decoder.pipeline
    session = None
    try:
        # One connection for all of it: the configuration (and so the scale) is
        # read first, and the run streams on the same open port.
        session = ChipSession(chip_url, BAUDRATE if baudrate is None else baudrate).open()
        chip_config = session.chip_config
        scale = [chip_scale_uv(chip_url, chip_config)] * pipeline.n_channels
        session.check(pipeline.n_channels, pipeline.signal_rate)
        if signals is not None:
            signals.raise_if_stopped()
        hand = create_hand(hand_spec, n_outputs=positions_of(decoder.backend), class_names=decoder.class_names)
    except BaseException:
        if session is not None:
            session.close()
        decoder.close()
        raise

    def check(chip_config_now):
        # After a reconnect: the chip must still be configured as when the run started.
        check_chip_config(chip_url, chip_config_now, pipeline.n_channels, pipeline.signal_rate, scale)

    info = decoder.metadata()
    info.update({"chip": chip_url, "chip_scale_uv": scale[0], "hand": hand_spec})
    info.update(metadata or {})
    if announce is not None:
        announce(chip_config)
    try:
        return run_realtime(pipeline, decoder.backend, hand, lambda receiver: session.start_streaming(receiver, check),
                            scale, decoder.channel_names, config, record_path=record_path, stats_path=stats_path,
                            duration_s=duration_s, quiet=quiet, metadata=info, install_signals=install_signals,
                            signals=signals, outlets=outlets, sent_classes=sent_classes)
    finally:
        session.close()   # already closed by the run, unless it failed before streaming


def positions_of(backend):
    """The finger positions among ``backend``'s outputs (all of them without a class head)."""
    return int(getattr(backend, "n_positions", backend.n_outputs))


def check_hand_classes(decoder, hand_spec):
    """Refuse, before any port opens, a ``keys:MAP`` whose class bindings the bundle's model cannot
    serve (ConfigError, one line); other hands take no classes."""
    from neurohand.firmware_bridge.hands import parse_hand_spec
    from neurohand.firmware_bridge.hands.keyboard import load_mapping

    name, target = parse_hand_spec(hand_spec)
    if name == "keys":
        load_mapping(target, positions_of(decoder.backend), decoder.class_names)
