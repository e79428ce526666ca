"""Lab file formats on the command line: ``export nwb``, and the ``nwb`` and ``xdf`` sources of ``import``.

``register(subparsers)`` adds ``neurohand export``; ``register_import_sources(sources)``
adds ``nwb`` and ``xdf`` to the sub-parsers of ``neurohand import`` (deploy/cli/train.py
calls it).  Only the standard library at module level: this module is imported on
the Jetson too, to build the parser.  pynwb and pyxdf (``pip install
'neurohand[lab]'``) are imported by the handlers; without them a handler says so
in one line (exit status 2).  Mapping and options: docs/interop.md.
"""


def register(subparsers):
    """Add ``neurohand export FORMAT`` to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "export", help="write a recording in a lab file format (NWB)",
        description="Write a neurohand recording in a file format other tools read. Choose the format as the "
                    "next word.")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    nwb = formats.add_parser(
        "nwb", help="Neurodata Without Borders (NWB 2, HDF5), with pynwb",
        description="Write the recording as an NWB 2 file: the signals as an ElectricalSeries with an "
                    "electrodes table (samples as stored, conversion to volts in the file), each label stream "
                    "as a behavioural time series (processing module 'behavior'), movement events as trials, "
                    "repetition events as the intervals 'repetitions', other events in the events table, and "
                    "the recording's header and metadata (protocol, settings) as JSON in the file's notes. "
                    "'neurohand import nwb' reads it back into an identical recording. Needs pynwb: "
                    "pip install 'neurohand[lab]'. See docs/interop.md.")
    nwb.add_argument("recording", metavar="REC", help="the recording to export")
    nwb.add_argument("out", metavar="OUT.nwb", help="NWB file to write (never the input)")
    nwb.add_argument("--force", action="store_true", help="replace an existing OUT.nwb")
    nwb.set_defaults(func=_run_export_nwb)


def register_import_sources(sources):
    """Add the ``nwb`` and ``xdf`` sources to the sub-parsers of ``neurohand import``."""
    nwb = sources.add_parser(
        "nwb", help="an NWB 2 file (one ElectricalSeries, behavioural time series)",
        description="Import an NWB 2 file. A file written by 'neurohand export nwb' comes back as the identical "
                    "recording. From other software: the ElectricalSeries becomes the signals (microvolts, or "
                    "int16 counts with their scales), the time series in the processing module 'behavior' (or "
                    "those named with --labels) the label streams, and a trials table's 'movement' and "
                    "'repetition' columns the events. Label series that do not start with the signals are "
                    "resampled onto the signal timeline causally and the unlabelled start is cut. Needs pynwb: "
                    "pip install 'neurohand[lab]'.")
    nwb.add_argument("file", metavar="FILE.nwb", help="the NWB file")
    nwb.add_argument("--out", required=True, metavar="REC", help="recording file to write (never the input)")
    nwb.add_argument("--force", action="store_true", help="replace an existing --out file")
    nwb.add_argument("--signals", default=None, metavar="NAME",
                     help="name or path of the ElectricalSeries (default: the only one)")
    nwb.add_argument("--labels", action="append", default=None, metavar="NAME",
                     help="name or path of a time series to take as a label stream (default: those in "
                          "processing/behavior); repeatable")
    nwb.set_defaults(func=_run_import_nwb)

    xdf = sources.add_parser(
        "xdf", help="an XDF file recorded with LabRecorder (Lab Streaming Layer)",
        description="Import streams of an XDF file. Clocks are synchronised and timestamps de-jittered as pyxdf "
                    "does it; the labels are resampled onto the signal timeline causally (the label at a sample "
                    "is the latest at or before it) and the unlabelled start and end are cut; breaks in the "
                    "signal stream up to --max-gap-s are filled with zeros and marked 'missing'. Markers of "
                    "--events become events: 'KIND:VALUE' (movement:3, repetition:2) or 'KIND' (value 0). Needs "
                    "pyxdf: pip install 'neurohand[lab]'.")
    xdf.add_argument("file", metavar="FILE.xdf", help="the XDF file (.xdf or .xdfz)")
    xdf.add_argument("--out", required=True, metavar="REC", help="recording file to write (never the input)")
    xdf.add_argument("--force", action="store_true", help="replace an existing --out file")
    xdf.add_argument("--signals", required=True, metavar="STREAM", help="name or type of the signal stream")
    xdf.add_argument("--labels", required=True, metavar="STREAM", help="name or type of the label stream")
    xdf.add_argument("--events", default=None, metavar="STREAM", help="name or type of a marker stream (optional)")
    xdf.add_argument("--max-gap-s", type=float, default=5.0, metavar="S",
                     help="longest break in the signal stream to fill with zeros (default: 5); a longer one is "
                          "refused as a clock jump")
    xdf.add_argument("--no-clock-sync", action="store_true",
                     help="do not synchronise the streams' clocks (pyxdf synchronize_clocks=False)")
    xdf.add_argument("--no-dejitter", action="store_true",
                     help="keep the recorded timestamps (pyxdf dejitter_timestamps=False)")
    xdf.set_defaults(func=_run_import_xdf)


def _print_summary(summary):
    # Imported here: deploy/cli/train.py imports this module to register the import sources.
    from neurohand.deploy.cli.train import _print_summary as print_summary
    print_summary(summary, False)


def _run_export_nwb(args):
    from neurohand.train import nwb_io
    _print_summary(nwb_io.export_nwb(args.recording, args.out, force=args.force))


def _run_import_nwb(args):
    from neurohand.train import nwb_io
    _print_summary(nwb_io.import_nwb(args.file, args.out, signals=args.signals, labels=args.labels,
                                     force=args.force))


def _run_import_xdf(args):
    from neurohand.train import xdf_io
    _print_summary(xdf_io.import_xdf(args.file, args.out, args.signals, args.labels, events=args.events,
                                     force=args.force, synchronize_clocks=not args.no_clock_sync,
                                     dejitter_timestamps=not args.no_dejitter, max_gap_s=args.max_gap_s))
