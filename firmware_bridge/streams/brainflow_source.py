"""``--chip brainflow:BOARD[:PORT]``: a board BrainFlow supports, decoded through the chip's runtime.

Specs::

    brainflow:synthetic                      BrainFlow's synthetic board (16 channels, 250 Hz)
    brainflow:cyton:/dev/ttyUSB0             OpenBCI Cyton on its USB dongle (8 channels, 250 Hz)
    brainflow:playback:FILE                  a file written by BrainFlow (DataFilter.write_file) of the
                                             synthetic board, replayed at its rate
    brainflow:playback:cyton:FILE            ... of another board (the "master board")

BOARD is a BrainFlow board name in lower case without ``_board``
(``cyton_daisy``, ``ganglion``, ...) or its numeric id; PORT, where given,
is the board's serial port (a device path, as for the chip).  The channels
decoded are the board's EXG channels (BrainFlow's ``get_exg_channels``, in
microvolts) in BrainFlow's order, the rate is the board's
(``get_sampling_rate``); both are checked against the bundle like the
chip's configuration.  Gaps are found from BrainFlow's package number on the
boards where it counts samples one by one (:data:`COUNTING_BOARDS`; it wraps
at 256), elsewhere from BrainFlow's timestamp channel (:mod:`.source`): the
timestamps are taken as samples are read, in bursts, and only a gap longer
than the tolerance is seen.  BrainFlow's own logging is switched off: its errors reach
the user as one line naming the board.

Polling: BrainFlow buffers samples in its own thread; the reader takes what
is there every :data:`POLL_S` (a wait, not a busy loop).

brainflow is imported only in :meth:`BrainFlowSource.open` and :func:`check_spec`.
"""
import difflib
import os
import re

import numpy as np

from neurohand.firmware_bridge.link import check_port
from neurohand.firmware_bridge.shared.checks import check_file_exists
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, UsageError
from neurohand.firmware_bridge.streams.source import SignalSource

PREFIX = "brainflow:"
PLAYBACK = ("playback", "playback_file")
#: How often the reader takes the samples BrainFlow has buffered (seconds).
POLL_S = 0.004
#: Boards whose package number steps by one per sample, modulo PACKAGE_MODULUS (BrainFlow's
#: synthetic board; the Cyton's packet counter is one byte, one sample per packet).
COUNTING_BOARDS = ("synthetic", "cyton")
PACKAGE_MODULUS = 256
#: Seconds of samples BrainFlow's ring buffer holds if the reader falls behind.
RING_BUFFER_S = 10
_BOARD_TOKEN = re.compile(r"^[a-z0-9_]+\Z")


def parse_spec(spec):
    """``brainflow:...`` -> (board, target or None); the syntax only (no brainflow needed)."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise UsageError("a BrainFlow source is brainflow:BOARD[:PORT], but got {!r}".format(spec))
    board, _, target = spec[len(PREFIX):].partition(":")
    board = board.strip().lower()
    if not board or not _BOARD_TOKEN.match(board):
        raise UsageError("--chip {!r}: give a BrainFlow board, e.g. brainflow:synthetic or "
                         "brainflow:cyton:/dev/ttyUSB0".format(spec))
    if board in PLAYBACK and not target:
        raise UsageError("--chip {!r}: the playback board needs a file: brainflow:playback:FILE".format(spec))
    return board, (target or None)


def _import_board_shim():
    try:
        from brainflow import board_shim
    except ImportError as exc:
        raise UsageError("--chip brainflow:... needs BrainFlow (pip install 'neurohand[lab]'; on a Jetson see "
                         "docs/lab-streams.md): {}".format(exc)) from None
    fix_library_lookup(board_shim)
    board_shim.BoardShim.disable_board_logger()
    return board_shim


def fix_library_lookup(module):
    """BrainFlow 5.20+ finds its library with ``importlib.resources.files(__name__)``, a module
    name, which only Python 3.12+ accepts; on older Pythons it falls back to pkg_resources, which
    setuptools 81+ no longer has.  Looked up from the module's package instead, it is the same file."""
    original = getattr(module, "files", None)
    if original is None or getattr(original, "neurohand_fix", False):
        return

    def files(anchor):
        try:
            return original(anchor)
        except TypeError:    # "... is not a package": Python < 3.12
            return original(anchor.rpartition(".")[0] or anchor)

    files.neurohand_fix = True
    module.files = files


def board_names(board_shim):
    """{name: board id} of every board this BrainFlow knows (``synthetic``, ``cyton``, ...)."""
    names = {}
    for board in board_shim.BoardIds:
        name = board.name.lower()
        if name.endswith("_board"):
            name = name[:-len("_board")]
        names[name] = board.value
    names["playback"] = board_shim.BoardIds.PLAYBACK_FILE_BOARD.value
    names.pop("no", None)
    return names


def board_id(board_shim, name, spec):
    """The BrainFlow id of board ``name``; UsageError naming the known ones otherwise."""
    names = board_names(board_shim)
    if name in names:
        return names[name]
    if name.isdigit() and int(name) in names.values():
        return int(name)
    close = difflib.get_close_matches(name, sorted(names), n=1)
    raise UsageError("--chip {!r}: BrainFlow {} knows no board {!r}{}; boards: {}".format(
        spec, getattr(board_shim.BoardShim, "get_version", lambda: "")(), name,
        "; did you mean {!r}?".format(close[0]) if close else "", ", ".join(sorted(names))))


def check_spec(spec):
    """The spec if its board exists and its port or file is acceptable; UsageError otherwise (imports brainflow)."""
    board, target = parse_spec(spec)
    board_shim = _import_board_shim()
    board_id(board_shim, board, spec)
    if board in PLAYBACK:
        master, path = _playback_target(board_shim, target)
        check_file_exists("--chip playback file", path)
    elif target is not None:
        check_port("--chip {} port".format(board), target)
    return spec


def _playback_target(board_shim, target):
    """``[MASTER:]FILE`` -> (master board name, file); the master is the synthetic board unless named."""
    head, colon, rest = target.partition(":")
    if colon and rest and head.lower() in board_names(board_shim):
        return head.lower(), rest
    return "synthetic", target


class BrainFlowSource(SignalSource):
    """A BrainFlow board as a signal source; see the module docstring.  The constructor only stores the spec."""

    noun = "BrainFlow board"

    def __init__(self, spec):
        super(BrainFlowSource, self).__init__(spec)
        self.board, self.target = parse_spec(spec)
        self._board_shim = None
        self._shim = None
        self._streaming = False
        self._rows = None
        self._timestamp_row = None
        self._package_row = None
        self.board_id = None
        self.master_id = None

    @staticmethod
    def check_spec(spec):
        return check_spec(spec)

    def open(self):
        """Prepare the board's session and read its channels and rate; LinkError if it cannot start."""
        check_spec(self.url)
        board_shim = self._board_shim = _import_board_shim()
        BoardShim = board_shim.BoardShim
        params = board_shim.BrainFlowInputParams()
        self.board_id = self.master_id = board_id(board_shim, self.board, self.url)
        master = self.board
        if self.board in PLAYBACK:
            master, path = _playback_target(board_shim, self.target)
            self.master_id = board_id(board_shim, master, self.url)
            params.file = os.path.abspath(path)
            params.master_board = self.master_id
        elif self.target is not None:
            params.serial_port = self.target
        try:
            rate = BoardShim.get_sampling_rate(self.master_id)
            self._rows = list(BoardShim.get_exg_channels(self.master_id))
            self._timestamp_row = BoardShim.get_timestamp_channel(self.master_id)
            if master in COUNTING_BOARDS:
                self._package_row = BoardShim.get_package_num_channel(self.master_id)
        except board_shim.BrainFlowError as exc:
            raise ConfigError("BrainFlow board {} ({}) has no EXG channels to decode: {}".format(
                self.board, self.url, exc)) from None
        shim = BoardShim(self.board_id, params)
        try:
            shim.prepare_session()
        except board_shim.BrainFlowError as exc:
            raise LinkError("BrainFlow board {} cannot start: {}".format(self.url, _one_line(exc))) from None
        self._shim = shim
        if self.board in PLAYBACK:
            try:
                # The samples are stamped as they are played, so that the gap rule sees the replay's time.
                shim.config_board("new_timestamps")
            except board_shim.BrainFlowError as exc:
                self._release()
                raise LinkError("BrainFlow board {}: {}".format(self.url, _one_line(exc))) from None
        self._configured(len(self._rows), rate, _channel_names(BoardShim, self.master_id, len(self._rows)),
                         counter_modulus=None if self._package_row is None else PACKAGE_MODULUS)
        return self

    def start_streaming(self, receiver, check_config=None):
        """Start the board's stream, then the reader thread feeding ``receiver``; LinkError if it will not start."""
        if self._shim is None:
            raise LinkError("BrainFlow board {} is not open".format(self.url))
        try:
            self._shim.start_stream(int(RING_BUFFER_S * self.chip_config.sample_rate_hz))
        except self._board_shim.BrainFlowError as exc:
            raise LinkError("BrainFlow board {} cannot stream: {}".format(self.url, _one_line(exc))) from None
        self._streaming = True
        return super(BrainFlowSource, self).start_streaming(receiver, check_config)

    def _stream(self):
        shim = self._shim
        rows, stamp_row, package_row = self._rows, self._timestamp_row, self._package_row
        first = True
        while not self._stop.wait(POLL_S):
            count = shim.get_board_data_count()
            if not count:
                continue
            data = shim.get_board_data(count)
            # (rows, n) -> (n, channels): the decoder's layout, owned by the chunk.
            samples = np.ascontiguousarray(data[rows].T)
            stamps = data[stamp_row]
            counts = (None, None) if package_row is None else (data[package_row, 0], data[package_row, -1])
            self._deliver(samples, float(stamps[0]), float(stamps[-1]), first, *counts)
            first = False

    def _release(self):
        shim, self._shim = self._shim, None
        if shim is None:
            return
        error = self._board_shim.BrainFlowError
        try:
            if self._streaming:
                shim.stop_stream()
        except error:
            pass     # stopping a board that already failed: releasing it is what matters now
        finally:
            try:
                shim.release_session()
            except error:
                pass


def _channel_names(BoardShim, board, n):
    try:
        names = BoardShim.get_eeg_names(board)
    except Exception:   # boards without EEG names (EMG, ECG): BrainFlow raises
        return None
    return names if len(names) == n else None


def _one_line(exc):
    return " ".join(str(exc).split())
