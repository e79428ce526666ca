"""Opening the chip for a run: the reconnecting serial link, the command
channel, a configuration check, START on open and STOP on close.

:func:`chip_opener` returns the ``open_chip(receiver)`` callable that
:class:`~neurohand.deploy.runtime.loop.RealtimeRunner` calls; the receiver
(a ChipReceiver) becomes the link's protocol object, so the link's reader
thread feeds the parser directly.
"""
from neurohand.firmware_bridge.errors import ConfigError, LinkError, ProtocolError

#: Default UART speed of the chip link (ignored by pseudo-terminals).
DEFAULT_BAUDRATE = 3000000


class ChipSession(object):
    """An open chip link that is streaming.  ``close()`` sends STOP (best effort) and closes."""

    def __init__(self, link, channel, chip_config):
        self.link = link
        self.channel = channel
        self.chip_config = chip_config

    @property
    def counters(self):
        return self.link.counters.as_dict()

    def close(self):
        try:
            self.channel.stop_streaming()
        except (LinkError, ProtocolError):
            pass  # the chip may be gone already; closing the port is what matters now
        finally:
            self.link.close()


def chip_opener(url, n_channels, sample_rate_hz, scale_uv=None, baudrate=DEFAULT_BAUDRATE,
                command_timeout_s=0.5):
    """Return ``open_chip(receiver) -> ChipSession`` for the chip at ``url``.

    On open: the link starts (LinkError if the port cannot be opened), the
    chip's configuration is read and compared with what the bundle expects
    (``n_channels``, ``sample_rate_hz`` and, if given, one ``scale_uv`` for
    every channel): a mismatch raises ConfigError before any data is decoded.
    Then START is sent.
    """
    from neurohand.firmware_bridge.chip_protocol import ChipCommandChannel
    from neurohand.firmware_bridge.serial_link import SerialLink

    def open_chip(receiver):
        link = SerialLink(url, receiver, baudrate=baudrate)
        link.open()
        try:
            channel = ChipCommandChannel(link.write, timeout_s=command_timeout_s)
            receiver.on_reply = channel.handle_reply
            chip_config = channel.get_config()
            _check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv)
            channel.start_streaming()
        except BaseException:
            link.close()
            raise
        return ChipSession(link, channel, chip_config)

    return open_chip


def _check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv):
    problems = []
    if chip_config.n_channels != n_channels:
        problems.append("{} channels, the decoder needs {}".format(chip_config.n_channels, n_channels))
    if abs(chip_config.sample_rate_hz - float(sample_rate_hz)) > 1e-6 * float(sample_rate_hz):
        problems.append("{} Hz, the decoder needs {:g} Hz".format(chip_config.sample_rate_hz, sample_rate_hz))
    if scale_uv is not None:
        # The chip reports one float32 scale for all channels.
        wrong = [s for s in scale_uv if abs(float(s) - chip_config.scale_uv) > 1e-6 * max(abs(float(s)), 1e-12)]
        if wrong:
            problems.append("scale {:g} µV/count, the run was given {}".format(chip_config.scale_uv,
                                                                               list(scale_uv)))
    if problems:
        raise ConfigError("chip at {} is configured for {}".format(url, "; ".join(problems)))
