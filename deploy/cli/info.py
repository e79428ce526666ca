"""Subcommands of this area (see neurohand.deploy.cli.main).  Standard library only
at module level; handlers import what they need."""
import json
import math
import sys
import warnings


def register(subparsers):
    """Add this area's subcommands to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "info", help="summarise a recording file (duration, channels, labels, events, integrity)",
        description="Summarise a neurohand recording (docs/recording-format.md): duration, signal "
                    "channels, rate, sample type and scale, label streams, event counts, metadata "
                    "and integrity. A recording cut off by a crash is summarised up to its last "
                    "complete chunk, with a warning.")
    parser.add_argument("file", metavar="FILE", help="the recording file to summarise")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object instead of text (keys: duration_s, "
                             "signal_rate, n_channels, channel_names, n_samples, dtype, scale_uv, "
                             "label_streams, events, metadata, integrity); NaN or infinity in the "
                             "metadata, which JSON cannot hold, print as null with a warning")
    parser.add_argument("--verify", action="store_true",
                        help="also check the CRC of every signal chunk (reads the whole file; "
                             "by default only headers, labels and events are checked)")
    parser.set_defaults(func=run_info)


def run_info(args):
    from neurohand.firmware_bridge.recording.file_format import open_recording

    # A damaged or cut-off recording warns once (RecordingTruncatedWarning,
    # naming the file, the problems and what was kept); the CLI prints every
    # warning as one "neurohand info: warning:" line.
    with open_recording(args.file, verify=args.verify) as rec:
        summary = summarise(rec)
    if args.json:
        summary, replaced = json_ready(summary)
        if replaced:
            warnings.warn("recording {!r}: {} {} NaN or infinite, which JSON cannot hold: printed as null".format(
                args.file, _listing(replaced), "is" if len(replaced) == 1 else "are"))
        print(json.dumps(summary, sort_keys=True, allow_nan=False))
    else:
        _print_text(summary)


def json_ready(value, where=""):
    """(``value`` as strict JSON can hold it, [paths of values replaced by null]).

    A header's metadata may hold NaN or Infinity (Python's JSON reader accepts
    them although JSON has none): they become null, and the caller says which.
    Keys become strings and tuples lists, as json.dumps would make them.
    """
    replaced = []

    def walk(item, path):
        if isinstance(item, float) and not math.isfinite(item):
            replaced.append(path or "the value")
            return None
        if isinstance(item, dict):
            return {str(key): walk(child, "{}.{}".format(path, key) if path else str(key))
                    for key, child in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(child, "{}[{}]".format(path, i)) for i, child in enumerate(item)]
        return item

    return walk(value, where), replaced


def _listing(paths, limit=5):
    shown = ", ".join(paths[:limit])
    return shown + (" and {} more values".format(len(paths) - limit) if len(paths) > limit else "")


def summarise(rec):
    """Return a dict describing an open Recording (JSON-able after :func:`json_ready`)."""
    counts = rec.events.kind_counts()
    return {
        "file": rec.path,
        "duration_s": rec.duration_s,
        "signal_rate": rec.signal_rate,
        "n_channels": rec.n_channels,
        "channel_names": list(rec.channel_names),
        "n_samples": rec.n_samples,
        "dtype": rec.dtype,
        # None for float32: those samples are microvolts already.
        "scale_uv": [float(s) for s in rec.scale_uv] if rec.dtype == "int16" else None,
        "label_streams": {name: {"rate": s.rate, "names": list(s.names), "n_samples": int(s.data.shape[0])}
                          for name, s in rec.label_streams.items()},
        "events": dict(sorted(counts.items())),
        "metadata": rec.metadata,
        "integrity": dict(rec.integrity),
    }


def _print_text(summary):
    rows = [
        ("file", summary["file"]),
        ("duration", "{:.3f} s ({} samples at {:g} Hz)".format(
            summary["duration_s"], summary["n_samples"], summary["signal_rate"])),
        ("signals", "{} channels, {}, {}".format(summary["n_channels"], summary["dtype"],
                                                 _scale_text(summary["scale_uv"]))),
        ("channels", ", ".join(summary["channel_names"])),
    ]
    streams = summary["label_streams"]
    if not streams:
        rows.append(("labels", "none"))
    for name, stream in streams.items():
        rows.append(("labels" if name == next(iter(streams)) else "",
                     "{}: {} rows at {:g} Hz ({:.3f} s), {} columns: {}".format(
                         name, stream["n_samples"], stream["rate"], stream["n_samples"] / stream["rate"],
                         len(stream["names"]), ", ".join(stream["names"]))))
    events = summary["events"]
    rows.append(("events", ", ".join("{}: {}".format(k, v) for k, v in events.items()) or "none"))
    rows.append(("metadata", json.dumps(summary["metadata"], sort_keys=True, ensure_ascii=False)
                  if summary["metadata"] else "none"))
    integrity = summary["integrity"]
    if integrity["complete"]:
        state = "complete"
    else:
        state = "TRUNCATED OR DAMAGED: {} ({} bytes ignored)".format(integrity["message"], integrity["bytes_ignored"])
    rows.append(("integrity", "{}; {} chunks, {} bytes, signal CRCs {}".format(
        state, integrity["chunks"], integrity["file_size"],
        "checked" if integrity["verified"] else "not checked (use --verify)")))
    for label, text in rows:
        _print_safely("{:<10} {}".format(label + ":" if label else "", text))


def _scale_text(scales):
    if scales is None:
        return "stored in microvolts"
    low, high = min(scales), max(scales)
    if low == high:
        return "{:g} uV per count".format(low)
    return "{:g} to {:g} uV per count (per channel)".format(low, high)


def _print_safely(line):
    # Python 3.6 under a C locale writes ASCII only; a channel name with
    # non-ASCII letters must not crash the summary.
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    print(line.encode(encoding, "backslashreplace").decode(encoding))
