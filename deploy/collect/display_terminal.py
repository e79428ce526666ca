"""``--display terminal``: the session's cues on a text terminal (works over SSH).

On a terminal (``isatty``): a full-screen view redrawn up to :data:`REDRAW_S`
times a second with ANSI escapes (the alternate screen, so the shell comes
back as it was): the current cue in large letters, its countdown, what comes
next, progress, one bar per finger (the glove live, the target marked), the
decoder's output with ``--decode``, and per channel its level, saturation and
a sparkline of the last two seconds.  No curses: a Jetson's minimal terminfo
and a ``TERM`` that SSH did not pass on must not stop a session.

Not a terminal (a pipe, a log file, systemd): one line per cue as it is shown,
and a status line every :data:`STATUS_EVERY_S`, so a log tells the whole story.

Standard library only (Python 3.6).
"""
import shutil
import sys
import time

REDRAW_S = 0.1
STATUS_EVERY_S = 10.0
SPARKS = " ▁▂▃▄▅▆▇█"
ASCII_SPARKS = " .:-=+*#%@"
BAR_WIDTH = 30

_ENTER = "\x1b[?1049h\x1b[?25l"
_LEAVE = "\x1b[?25h\x1b[?1049l"
_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"
_BOLD, _REVERSE, _DIM, _RESET = "\x1b[1m", "\x1b[7m", "\x1b[2m", "\x1b[0m"


class TerminalDisplay(object):
    """Show the session's state on ``stream`` (stdout); ``fullscreen`` None = when it is a terminal."""

    def __init__(self, stream=None, fullscreen=None, clock=time.monotonic):
        self.stream = sys.stdout if stream is None else stream
        if fullscreen is None:
            isatty = getattr(self.stream, "isatty", None)
            fullscreen = bool(isatty and isatty())
        self.fullscreen = fullscreen
        self._clock = clock
        self._entered = False
        self._last_draw = None
        self._last_status = None
        self._last_step = None
        encoding = (getattr(self.stream, "encoding", None) or "ascii").lower()
        self._unicode = "utf" in encoding
        self.lines_written = 0

    def show(self, state):
        now = self._clock()
        if self.fullscreen:
            if self._last_draw is not None and now - self._last_draw < REDRAW_S:
                return
            self._last_draw = now
            self._draw(state)
        else:
            self._log(state, now)

    def close(self):
        if self._entered:
            self._write(_LEAVE)
            self._entered = False

    # -- not a terminal: lines -------------------------------------------------------
    def _log(self, state, now):
        step = state.get("step")
        key = None if step is None else (state["phase"], step["index"])
        if key != self._last_step and step is not None:
            self._last_step = key
            progress = state["progress"]
            where = "calibration" if state["phase"] == "calibration" else "trial {}/{}{}".format(
                min(progress["done"] + (1 if step["kind"] == "move" else 0), progress["total"]), progress["total"],
                ", repetition {}".format(step["repetition"]) if step["repetition"] else "")
            self._line("[{:7.1f} s] {}: {} ({:g} s)".format(state["elapsed_s"], where, step["label"],
                                                           step["duration_s"]))
        if self._last_status is None or now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            self._line(self._status_text(state))

    def _status_text(self, state):
        glove = state.get("glove")
        fingers = state["fingers"]
        parts = ["glove " + (" ".join("{}={:.2f}".format(f[:2], v) for f, v in zip(fingers, glove))
                             if glove else "-")]
        rms = [v for v in state["channels"]["rms_uv"] if v is not None]
        if rms:
            parts.append("channels rms {:.1f}..{:.1f} uV".format(min(rms), max(rms)))
        counters = state["counters"]
        parts.append("lost: chip {} samples, glove {}".format(counters["chip_samples_missing"], counters["glove_lost"]))
        return "[status] " + "; ".join(parts)

    def _line(self, text):
        self._write(text + "\n")
        self.lines_written += 1

    # -- a terminal: the full screen --------------------------------------------------
    def _draw(self, state):
        if not self._entered:
            self._write(_ENTER)
            self._entered = True
        width, height = shutil.get_terminal_size((100, 40))
        lines = self._screen(state, max(40, width))
        out = [_HOME]
        for line in lines[:max(1, height - 1)]:
            out.append(line + _CLEAR_LINE + "\n")
        out.append(_CLEAR_BELOW)
        self._write("".join(out))

    def _screen(self, state, width):
        step, progress = state.get("step"), state["progress"]
        lines = ["{}neurohand collect{}  protocol {}  |  {}  |  {:.0f} s".format(
            _BOLD, _RESET, state.get("protocol", "?"),
            "calibration" if state["phase"] == "calibration" else "trials {}/{}".format(progress["done"],
                                                                                        progress["total"]),
            state["elapsed_s"]), ""]
        if step is None:
            lines.append("  (done)")
        else:
            label = step["label"].upper()
            lines.append("  " + _REVERSE + _BOLD + "  {}  ".format(label) + _RESET + "   {:4.1f} s".format(
                step["left_s"]))
            fraction = 1.0 - step["left_s"] / step["duration_s"] if step["duration_s"] else 1.0
            lines.append("  " + self._bar(fraction, min(60, width - 4)))
            following = state.get("next")
            lines.append("  next: {}".format(following["label"] if following else "end"))
            if step["repetition"]:
                lines.append("  repetition {}".format(step["repetition"]))
        phase_total = progress.get("total") or 0
        if state["phase"] != "calibration" and phase_total:
            lines.append("  progress " + self._bar(progress["done"] / float(phase_total), min(40, width - 12)))
        lines.append("")
        lines.append("  finger    glove (| target)" + (" / decoded" if state.get("decoded") else ""))
        glove, decoded = state.get("glove"), state.get("decoded")
        target = step["posture"] if step else None
        for i, finger in enumerate(state["fingers"]):
            value = glove[i] if glove else None
            line = "  {:<8} {} {}".format(finger, self._finger_bar(value, None if target is None else target[i]),
                                         "-" if value is None else "{:.2f}".format(value))
            if decoded:
                line += "  dec {} {:.2f}".format(self._finger_bar(decoded[i], None, width=12), decoded[i])
            lines.append(line)
        lines.append("")
        channels = state["channels"]
        lines.append("  channel   rms uV  saturated  last 2 s")
        spark_width = max(10, min(50, width - 36))
        for c, rms in enumerate(channels["rms_uv"]):
            saturation = channels["saturation"][c]
            lines.append("  ch{:02d}   {:>8}  {:>8}  {}".format(
                c, "-" if rms is None else "{:.1f}".format(rms),
                "-" if saturation is None else "{:.1%}".format(saturation),
                self._sparkline(channels["trace_min_uv"][c], channels["trace_max_uv"][c], spark_width)))
        counters = state["counters"]
        lines.append("")
        lines.append("  lost: chip {} samples, glove {} samples, {} label rows held".format(
            counters["chip_samples_missing"], counters["glove_lost"], counters["glove_rows_held"]))
        lines.append("  " + _DIM + "Ctrl-C ends the session and keeps what was recorded" + _RESET)
        return lines

    def _bar(self, fraction, width):
        fraction = min(1.0, max(0.0, fraction))
        full = int(round(fraction * width))
        fill, empty = ("█", "░") if self._unicode else ("#", ".")
        return "[" + fill * full + empty * (width - full) + "]"

    def _finger_bar(self, value, target, width=BAR_WIDTH):
        cells = [" "] * width
        if value is not None:
            full = int(round(min(1.0, max(0.0, value)) * width))
            for i in range(full):
                cells[i] = "█" if self._unicode else "#"
        if target is not None:
            at = min(width - 1, int(round(min(1.0, max(0.0, target)) * (width - 1))))
            cells[at] = "|"
        return "[" + "".join(cells) + "]"

    def _sparkline(self, lows, highs, width):
        if not highs:
            return ""
        spans = [h - l for l, h in zip(lows, highs)][-width:]
        top = max(spans) or 1.0
        sparks = SPARKS if self._unicode else ASCII_SPARKS
        return "".join(sparks[min(len(sparks) - 1, int(round(s / top * (len(sparks) - 1))))] for s in spans)

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except UnicodeEncodeError:
            self._unicode = False
            self.stream.write(text.encode("ascii", "replace").decode("ascii"))
            self.stream.flush()
        except (OSError, ValueError):
            pass   # the terminal went away (SSH dropped): the recording goes on
