"""The synthetic nerve simulator and ``neurohand simulate`` (docs/simulator.md)."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from neurohand.deploy.cli import main as cli
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.virtual.simulator import (
    INT16_MAX, INT16_MIN, LABEL_RATE, SCALE_UV, SIMULATOR_VERSION, NerveSimulator, SimulatorConfig,
    generate, write_recording)
from neurohand.firmware_bridge.virtual.units import firing_rates
from neurohand.firmware_bridge.virtual.yardstick import linear_decoder_r2, window_features
from neurohand.firmware_bridge.virtual.movements import FINGERS, MOVEMENTS

RATE = 10000.0


@pytest.fixture(scope="module")
def recording():
    """The documented easy yardstick recording: 120 s (three passes of the protocol) at
    16 channels, easy preset, seed 0: (config, signals, labels, events)."""
    config = SimulatorConfig(seconds=120.0, seed=0, difficulty="easy")
    signals, labels, events = generate(config)
    return config, signals, labels, events


@pytest.fixture(scope="module")
def realistic():
    """The same with the default (realistic) preset: (config, signals, labels, events)."""
    config = SimulatorConfig(seconds=120.0, seed=0)
    signals, labels, events = generate(config)
    return config, signals, labels, events


def movement_spans(events, n_samples):
    """[(movement id, start sample, end sample)] from the movement events; a
    movement still going at the end of the recording ends at ``n_samples``."""
    spans = []
    open_span = None
    for sample, kind, value in events:
        if kind != "movement":
            continue
        if value:
            open_span = (value, sample)
        elif open_span is not None:
            spans.append((open_span[0], open_span[1], sample))
            open_span = None
    if open_span is not None:
        spans.append((open_span[0], open_span[1], n_samples))
    return spans


# -- reproducibility -------------------------------------------------------------

# SHA-256 of signals (int16 LE), labels (float32 LE) and repr(events), recorded with
# simulator version 1 (before the difficulty presets existed, under Python 3.11 +
# numpy 2.4 and Python 3.6 + numpy 1.19): the easy preset must reproduce them.
VERSION_1_DIGESTS = [
    (dict(seconds=12.0, seed=0), "a7929fe8f34f964c913ac4485cbe376895c9db59d9fea473e7c24a8876bf6640"),
    (dict(seconds=8.0, seed=3, n_channels=8, rate=20000.0, mains_hz=60),
     "bc71d3ae1df5d2858fec2da1833e7b3278b0735f0e6df9db81cad179abb137aa"),
    (dict(seconds=40.0, seed=1, n_channels=4, rate=5000.0),
     "702eadc03481708a1c593cd4a743d125874161d2454e8e0c79471e6d2dcbe72a"),
    (dict(seconds=6.0, seed=7, n_channels=6, artefact_interval_s=0.0, noise_uv=5.0, units_per_channel=2,
          hash_per_channel=5, drift_uv=0.0),
     "c5b9319e310eb4b3622b5f5f7782d66ad15421acb668d4e3960f88c08df4eff0"),
]


def digest(signals, labels, events):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(signals).astype("<i2").tobytes())
    h.update(np.ascontiguousarray(labels).astype("<f4").tobytes())
    h.update(repr(events).encode())
    return h.hexdigest()


@pytest.mark.parametrize("kwargs, expected", VERSION_1_DIGESTS)
def test_easy_preset_is_version_1_bit_for_bit(kwargs, expected):
    assert digest(*generate(SimulatorConfig(difficulty="easy", **kwargs))) == expected


def test_realistic_is_not_version_1():
    kwargs, expected = VERSION_1_DIGESTS[0]
    assert digest(*generate(SimulatorConfig(**kwargs))) != expected


@pytest.mark.parametrize("difficulty", ["realistic", "easy"])
def test_same_seed_same_data_different_seed_different_data(difficulty):
    a = generate(SimulatorConfig(seconds=2.0, n_channels=4, seed=5, difficulty=difficulty))
    b = generate(SimulatorConfig(seconds=2.0, n_channels=4, seed=5, difficulty=difficulty))
    c = generate(SimulatorConfig(seconds=2.0, n_channels=4, seed=6, difficulty=difficulty))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert np.mean(a[0] != c[0]) > 0.5


def test_realistic_same_seed_same_file_byte_for_byte(tmp_path):
    config = SimulatorConfig(seconds=5.0, n_channels=4, seed=3)
    write_recording(str(tmp_path / "a.nh"), config, block_seconds=0.7)
    write_recording(str(tmp_path / "b.nh"), config, block_seconds=0.7)
    assert (tmp_path / "a.nh").read_bytes() == (tmp_path / "b.nh").read_bytes()


@pytest.mark.parametrize("difficulty", ["realistic", "easy"])
def test_block_size_does_not_change_the_data(difficulty):
    config = SimulatorConfig(seconds=3.0, n_channels=6, seed=11, artefact_interval_s=1.0, difficulty=difficulty)
    whole = generate(config, block_samples=30000)
    for block in (1000, 4321, 9999):
        other = generate(config, block_samples=block)
        assert np.array_equal(whole[0], other[0]), block
        assert np.array_equal(whole[1], other[1]), block
        assert whole[2] == other[2]


@pytest.mark.parametrize("n_channels, rate", [(1, 1000.0), (3, 1250.0), (2, 50000.0), (4, 44100.5)])
def test_block_independence_holds_for_odd_rates_and_channel_counts(n_channels, rate):
    config = SimulatorConfig(seconds=1.3, n_channels=n_channels, rate=rate, seed=1)
    a, b = generate(config, block_samples=977), generate(config, block_samples=10 ** 6)
    assert a[0].shape == (int(round(1.3 * rate)), n_channels)
    assert a[1].shape == (int(np.ceil(a[0].shape[0] * LABEL_RATE / rate)), 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("difficulty", ["realistic", "easy"])
def test_any_sample_range_equals_the_same_range_of_a_longer_run(difficulty):
    config = SimulatorConfig(seconds=2.0, n_channels=3, seed=2, difficulty=difficulty)
    full = NerveSimulator.from_config(config).signals(0, 20000)
    fresh = NerveSimulator.from_config(config)          # no cached segments
    assert np.array_equal(fresh.signals(12345, 15000), full[12345:15000])
    longer = NerveSimulator.from_config(SimulatorConfig(seconds=3.0, n_channels=3, seed=2, difficulty=difficulty))
    assert np.array_equal(longer.signals(0, 20000), full)


# -- labels and protocol -------------------------------------------------------

def test_labels_cover_the_recording_in_range_and_smooth(recording):
    config, _, labels, _ = recording
    assert labels.dtype == np.float32
    assert labels.shape == (int(config.seconds * LABEL_RATE), len(FINGERS))
    assert labels.min() >= 0.0 and labels.max() <= 1.0
    step = np.abs(np.diff(labels, axis=0))
    # Fastest ramp: full flexion in about 0.3 s with a minimum-jerk profile.
    assert step.max() < 0.08
    assert np.abs(np.diff(labels, n=2, axis=0)).max() < 0.015


def test_each_finger_moves_in_its_movements_and_rests_otherwise(recording):
    config, signals, labels, events = recording
    spans = movement_spans(events, signals.shape[0])
    assert [m for m, _, _ in spans][:24] == list(range(1, 9)) * 3
    names = {i: fingers for i, _, fingers in MOVEMENTS}
    moving = np.zeros(labels.shape[0], bool)
    for movement, start, stop in spans:
        j0, j1 = int(start * LABEL_RATE / RATE), int(stop * LABEL_RATE / RATE) + 1
        moving[j0:j1] = True
        peak = labels[j0:j1].max(axis=0)
        for f, finger in enumerate(FINGERS):
            if finger in names[movement]:
                assert peak[f] > 0.6, (movement, finger)
            else:
                assert peak[f] < 0.5, (movement, finger)
    assert np.abs(labels[~moving]).max() < 1e-3


def test_events_mark_repetitions_and_movements(recording):
    _, signals, _, events = recording
    samples = [s for s, _, _ in events]
    assert samples == sorted(samples) and 0 <= samples[0] and samples[-1] < signals.shape[0]
    assert ("repetition", 1) in [(k, v) for _, k, v in events]
    assert {k for _, k, _ in events} == {"movement", "repetition"}


# -- signal statistics ---------------------------------------------------------

def test_noise_floor_is_a_few_microvolts_and_follows_the_setting():
    def floor(noise_uv):
        config = SimulatorConfig(seconds=1.0, n_channels=8, seed=4, noise_uv=noise_uv, artefact_interval_s=0,
                                 difficulty="easy")
        signals = generate(config)[0].astype(np.float64) * SCALE_UV
        # Robust rms of the differenced signal: spikes are rare outliers, the
        # drift and mains are slow; white noise's difference has sqrt(2) x its rms.
        d = np.diff(signals, axis=0)
        return np.median(np.median(np.abs(d), axis=0) / 0.6745 / np.sqrt(2))
    assert 2.0 < floor(3.0) < 5.0
    assert 5.0 < floor(6.0) < 9.0


@pytest.mark.parametrize("mains", [50, 60])
def test_mains_interference_and_harmonic_in_spectrum(mains):
    config = SimulatorConfig(seconds=4.0, n_channels=2, seed=8, mains_hz=mains, artefact_interval_s=0)
    x = generate(config)[0][:, 0].astype(np.float64)
    x = x - x.mean()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1.0 / RATE)

    def peak_ratio(f):
        at = np.argmin(np.abs(freqs - f))
        neighbours = np.concatenate([spectrum[at - 40:at - 5], spectrum[at + 5:at + 40]])
        return spectrum[at - 1:at + 2].max() / np.median(neighbours)
    assert peak_ratio(mains) > 30
    assert peak_ratio(3 * mains) > 10
    other = 60 if mains == 50 else 50
    assert peak_ratio(other) < 5


def test_saturation_is_real_clipping_and_rare():
    config = SimulatorConfig(seconds=8.0, n_channels=4, seed=9, artefact_interval_s=1.0)
    signals = generate(config)[0]
    clipped = (signals == INT16_MAX) | (signals == INT16_MIN)
    assert clipped.any()
    assert clipped.mean() < 0.05
    sim = NerveSimulator.from_config(config)
    raw = sim.signals_uv(0, config.n_samples) / SCALE_UV
    assert np.array_equal(clipped, (raw >= INT16_MAX + 0.5) | (raw <= INT16_MIN - 0.5))


def test_default_recording_saturates_rarely(recording):
    _, signals, _, _ = recording
    assert np.mean((signals == INT16_MAX) | (signals == INT16_MIN)) < 0.005


def finger_correlations(config, reference_labels=None):
    """Largest |correlation| of each channel's log RMS with any finger, (n_channels,)."""
    signals, labels, _ = generate(config)
    labels = labels if reference_labels is None else reference_labels
    features, end_sample = window_features(signals, config.rate)
    log_rms = features[:, :config.n_channels]
    label_index = np.minimum((end_sample * LABEL_RATE / config.rate).astype(int) - 1, labels.shape[0] - 1)
    fingers = labels[label_index]
    corr = np.corrcoef(log_rms.T, fingers.T)[:config.n_channels, config.n_channels:]
    return np.abs(corr).max(axis=1), labels


def test_channel_power_is_tuned_to_fingers():
    # Without motion artefacts: a few extreme windows would dominate a Pearson correlation.
    config = SimulatorConfig(seconds=40.0, seed=3, artefact_interval_s=0, difficulty="easy")
    best, labels = finger_correlations(config)
    assert np.median(best) > 0.3
    # The units carry it: without them, the same labels find nothing in the channels.
    config0 = SimulatorConfig(seconds=40.0, seed=3, artefact_interval_s=0, units_per_channel=0,
                              hash_per_channel=0, difficulty="easy")
    best0, _ = finger_correlations(config0, reference_labels=labels)
    assert np.median(best0) < 0.15


def test_linear_decoder_is_useful_but_not_perfect(recording):
    config, signals, labels, _ = recording
    result = linear_decoder_r2(signals, labels, config.rate)
    assert 0.2 < result["mean_r2"] < 0.9, result


def test_linear_decoder_on_realistic_is_as_hard_as_real_implants(realistic):
    # Offline decoding from Utah slanted arrays in amputees: r 0.28-0.53 (Wendelken
    # et al. 2017, Table 2); the yardstick on the realistic preset lands in that range.
    config, signals, labels, _ = realistic
    result = linear_decoder_r2(signals, labels, config.rate)
    assert 0.25 < result["mean_r"] < 0.6, result


def test_realistic_motor_units_are_silent_at_rest_and_recruited_by_effort():
    sim = NerveSimulator.from_config(SimulatorConfig(seconds=5.0, seed=1))
    units = sim.units
    motor = np.nonzero(units.kind != 2)[0]
    zero = np.zeros((motor.size, 5))
    assert np.all(firing_rates(units, motor, zero, zero) == 0.0)
    half, full = np.full((motor.size, 5), 0.3), np.ones((motor.size, 5))
    at_half, at_full = firing_rates(units, motor, half, zero), firing_rates(units, motor, full, zero)
    flexors = units.kind[motor] == 0
    assert 0.2 < np.mean(at_half[flexors] > 0) < 0.95          # some recruited, not all
    assert np.all(at_full[flexors] >= at_half[flexors]) and np.all(at_full[flexors] > 0)
    assert np.all(at_full <= units.max_hz[motor] + 1e-9)
    untuned = np.nonzero(units.kind == 2)[0]
    assert np.all(units.base_hz[untuned] < 2.0 + 1e-9)        # the slow background


def test_realistic_nerve_leads_the_glove_and_order_varies():
    # The lead options' own range: the mirror mismatch's timing scatter (tested below)
    # widens it on purpose.
    sim = NerveSimulator.from_config(SimulatorConfig(seconds=300.0, seed=4, mirror_timing_sd_s=0.0))
    p = sim.protocol
    lead = p.onset.min(axis=1) - p.intent_onset.min(axis=1)
    assert np.all(lead > 0.0) and 0.04 < np.mean(lead) < 0.14
    release_glove = (p.onset + p.up + p.hold).min(axis=1)
    release_intent = (p.intent_onset + p.intent_up + p.intent_hold).min(axis=1)
    assert np.mean(release_intent < release_glove) > 0.9
    orders = {}
    for movement, repetition in zip(p.movement, p.repetition):
        orders.setdefault(int(repetition), []).append(int(movement))
    full = [tuple(o) for o in orders.values() if len(o) == 8]
    assert len(full) >= 5 and all(sorted(o) == list(range(1, 9)) for o in full)
    assert len(set(full)) == len(full)                         # no two repetitions alike
    easy = NerveSimulator.from_config(SimulatorConfig(seconds=300.0, seed=4, difficulty="easy")).protocol
    assert list(easy.movement[:16]) == list(range(1, 9)) * 2


def test_realistic_artefacts_come_with_movements():
    sim = NerveSimulator.from_config(SimulatorConfig(seconds=300.0, seed=2, artefact_interval_s=0))
    starts = np.array([a["start"] for a in sim.artefacts]) / sim.config.rate
    assert starts.size >= 5
    after = starts[:, None] - sim.protocol.window_start[None, :]
    assert np.all(((after >= 0) & (after <= 0.4)).any(axis=1))


def psd_slope(config, lo, hi):
    x = generate(config)[0].astype(np.float64) * SCALE_UV
    seg = int(config.rate)
    psd = sum((np.abs(np.fft.rfft((x[k:k + seg] - x[k:k + seg].mean(axis=0)) * np.hanning(seg)[:, None],
                                  axis=0)) ** 2).mean(axis=1) for k in range(0, x.shape[0] - seg + 1, seg))
    freq = np.fft.rfftfreq(seg, 1.0 / config.rate)
    band = (freq >= lo) & (freq <= hi)
    return np.polyfit(np.log10(freq[band]), np.log10(psd[band]), 1)[0]


def test_realistic_noise_has_a_1_over_f_part():
    quiet = dict(seconds=8.0, n_channels=4, seed=5, units_per_channel=0, hash_per_channel=0, mains_uv=0.0,
                 drift_uv=0.0, artefact_interval_s=0, artefact_onset_prob=0.0, emg_uv=0.0)
    pink = psd_slope(SimulatorConfig(flicker_uv=20.0, **quiet), 3.0, 100.0)
    white = psd_slope(SimulatorConfig(flicker_uv=0.0, **quiet), 3.0, 100.0)
    assert -1.6 < pink < -0.6 and abs(white) < 0.2, (pink, white)


def test_metadata_records_difficulty_and_every_option():
    meta = NerveSimulator.from_config(SimulatorConfig(seconds=5.0, seed=1)).metadata()
    config = meta["simulator"]["config"]
    assert config["difficulty"] == "realistic" and meta["simulator"]["version"] == 2
    for name in ("lead_min_s", "lead_max_s", "recruitment", "random_order", "electrode_noise_uv", "flicker_uv",
                 "emg_uv", "artefact_onset_prob", "fascicles", "fascicle_purity", "shared_fraction",
                 "aligned_release", "noise_uv"):
        assert name in config, name
    assert "drawn" in meta["protocol"]["order"]
    easy = NerveSimulator.from_config(SimulatorConfig(seconds=5.0, seed=1, difficulty="easy")).metadata()
    assert easy["simulator"]["config"]["recruitment"] is False and "id order" in easy["protocol"]["order"]


def test_metadata_describes_protocol_and_seed():
    sim = NerveSimulator.from_config(SimulatorConfig(seconds=20.0, seed=12, difficulty="easy"))
    meta = sim.metadata()
    assert meta["simulator"]["version"] == SIMULATOR_VERSION
    assert meta["simulator"]["config"]["seed"] == 12
    assert [m["name"] for m in meta["protocol"]["movements"]][:3] == ["rest", "thumb", "index"]
    assert meta["protocol"]["trials"][0]["movement"] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(seconds=0), "seconds must be greater than 0"),
    (dict(seconds=1e6), "seconds must be at most 86400"),
    (dict(seconds=1e-5), "gives no samples"),
    (dict(seconds=1, n_channels=257), "channels must be at most 256"),
    (dict(seconds=1, rate=999), "rate must be at least 1000"),
    (dict(seconds=1, seed=-3), "seed must be at least 0"),
    (dict(seconds=1, mains_hz=55), "mains must be one of"),
    (dict(seconds=1, difficulty="hard"), "difficulty must be one of"),
    (dict(seconds=1, fascicle_purity=1.5), "fascicle_purity must be at most 1"),
    (dict(seconds=1, recruitment="yes"), "recruitment must be true or false"),
    (dict(seconds=1, lead_min_s=0.2, lead_max_s=0.1), "lead_min_s must be <= lead_max_s"),
    (dict(seconds=1, fascicles=0), "fascicles must be at least 1"),
    (dict(seconds=1, emg_uv=-1), "emg_uv must be at least 0"),
    (dict(seconds=1, bogus=1), "unknown simulator option 'bogus'"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SimulatorConfig(**kwargs)


# -- the command line ------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "simulate"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def test_cli_writes_identical_files_for_the_same_seed(tmp_path):
    from neurohand.firmware_bridge.recording.file_format import open_recording

    paths = [str(tmp_path / "a.rec"), str(tmp_path / "b")]
    for path in paths:
        result = run_cli("--out", path, "--seconds", "3", "--channels", "4", "--seed", "1", "--quiet")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and result.stderr == ""
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rec", "b"]     # no extension added
    refused = run_cli("--out", paths[1], "--seconds", "3", "--channels", "4", "--seed", "2", "--quiet")
    assert refused.returncode == 2 and "--force" in refused.stderr
    again = run_cli("--out", paths[1], "--seconds", "3", "--channels", "4", "--seed", "2", "--quiet", "--force")
    assert again.returncode == 0
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() != b.read()

    expected = generate(SimulatorConfig(seconds=3.0, n_channels=4, seed=1))
    with open_recording(paths[0], verify=True) as rec:
        assert rec.signal_rate == RATE and rec.n_channels == 4 and rec.dtype == "int16"
        assert np.allclose(rec.scale_uv, SCALE_UV)
        assert np.array_equal(rec.read_signals(), expected[0])
        fingers = rec.label_streams["fingers"]
        assert fingers.rate == LABEL_RATE and list(fingers.names) == list(FINGERS)
        assert np.array_equal(fingers.data, expected[1])
        assert [(e.sample, e.kind, e.value) for e in rec.events] == expected[2]
        assert rec.metadata["simulator"]["config"]["seed"] == 1


def test_cli_reports_progress_and_summary(tmp_path):
    result = run_cli("--out", str(tmp_path / "r.nh"), "--seconds", "1.5", "--channels", "2")
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr
    assert "wrote" in result.stdout and "2 channels" in result.stdout and "difficulty realistic" in result.stdout


def test_cli_difficulty_easy_is_the_easy_preset(tmp_path):
    from neurohand.firmware_bridge.recording.file_format import open_recording

    path = str(tmp_path / "e.nh")
    result = run_cli("--out", path, "--seconds", "2", "--channels", "3", "--seed", "4", "--difficulty", "easy",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    expected = generate(SimulatorConfig(seconds=2.0, n_channels=3, seed=4, difficulty="easy"))
    with open_recording(path, verify=True) as rec:
        assert np.array_equal(rec.read_signals(), expected[0])
        assert rec.metadata["simulator"]["config"]["difficulty"] == "easy"


@pytest.mark.parametrize("args, message", [
    (["--seconds", "0"], "seconds must be greater than 0"),
    (["--seconds", "-1"], "seconds must be greater than 0"),
    (["--seconds", "ten"], "seconds must be a number"),
    (["--seconds", "inf"], "seconds must be finite"),
    (["--seconds", "1", "--channels", "0"], "channels must be at least 1"),
    (["--seconds", "1", "--channels", "300"], "channels must be at most 256"),
    (["--seconds", "1", "--channels", "2.5"], "channels must be an integer"),
    (["--seconds", "1", "--rate", "100"], "rate must be at least 1000"),
    (["--seconds", "1", "--rate", "60000"], "rate must be at most 50000"),
    (["--seconds", "1", "--seed", "x"], "seed must be an integer"),
    (["--seconds", "1", "--mains", "55"], "mains must be one of"),
    (["--seconds", "1", "--difficulty", "easyy"], "did you mean 'easy'"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "r.nh"
    assert cli.main(["simulate", "--out", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurohand simulate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_bad_argument_in_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("--out", str(tmp_path / "r.nh"), "--seconds", "-2")
    assert result.returncode == 2
    assert result.stderr.strip() == "neurohand simulate: error: seconds must be greater than 0.0, but got -2.0"


def test_cli_refuses_a_directory_or_missing_folder(tmp_path, capsys):
    for out, message in ((str(tmp_path), "is a directory"), (str(tmp_path / "missing" / "r.nh"), "does not exist")):
        assert cli.main(["simulate", "--out", out, "--seconds", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_cli_help_explains_the_data():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("--out", "--force", "--seconds", "--channels", "--rate", "--seed", "--mains", "--quiet",
                 "0.195", "fingers", "pinch", "clip"):
        assert word in result.stdout, word


MIRROR_OFF = dict(mirror_effort_sd=0.0, mirror_timing_sd_s=0.0, mirror_cocontraction=0.0, mirror_miss_prob=0.0)


def test_mirror_mismatch_changes_the_intent_only():
    kwargs = dict(seconds=600.0, seed=3)
    off = NerveSimulator.from_config(SimulatorConfig(**dict(kwargs, **MIRROR_OFF))).protocol
    sim = NerveSimulator.from_config(SimulatorConfig(mirror_miss_prob=0.3, mirror_cocontraction=0.5,
                                                     mirror_effort_sd=0.5, mirror_timing_sd_s=0.1, **kwargs))
    on = sim.protocol
    for name in ("onset", "up", "hold", "down", "amp", "intent_up", "intent_hold", "intent_down"):
        assert np.array_equal(getattr(on, name), getattr(off, name)), name
    missed = on.intent_amp.max(axis=1) == 0
    assert 0.15 < missed.mean() < 0.45 and off.intent_amp.max(axis=1).min() > 0
    # Co-contraction: fingers the glove leaves still are intended in performed trials.
    still = (on.amp == 0) & ~missed[:, None]
    assert still.any() and np.all(off.intent_amp[still] == 0) and np.mean(on.intent_amp[still] > 0) > 0.9
    assert on.intent_amp[still].max() <= 0.5
    # Per-trial timing: the whole intent moves together.
    shift = (on.intent_onset - off.intent_onset)
    assert np.allclose(shift, shift[:, :1]) and 0.05 < np.std(shift[:, 0]) < 0.15
    moved = (on.amp > 0) & ~missed[:, None] & (off.intent_amp < 0.5)
    ratio = np.log(on.intent_amp[moved] / off.intent_amp[moved])
    assert 0.3 < np.std(ratio) < 0.7
    easy = SimulatorConfig(seconds=1.0, difficulty="easy")
    assert all(getattr(easy, name) == 0 for name in MIRROR_OFF) and easy.electrode_yield == 1.0


def test_mirror_mismatch_leaves_the_labels_and_moves_the_spikes():
    kwargs = dict(seconds=20.0, seed=1, n_channels=4)
    off_signals, off_labels, off_events = generate(SimulatorConfig(**dict(kwargs, **MIRROR_OFF)))
    signals, labels, events = generate(SimulatorConfig(**kwargs))
    assert np.array_equal(labels, off_labels) and events == off_events
    assert not np.array_equal(signals, off_signals)


def test_electrode_yield_silences_whole_channels_of_the_patient():
    def units(**kwargs):
        sim = NerveSimulator.from_config(SimulatorConfig(seconds=2.0, seed=7, electrode_yield=0.75, **kwargs))
        gain = np.zeros(16)
        np.add.at(gain, sim.units.proj_channel, np.abs(sim.units.proj_gain_uv))
        return gain > 0
    recording = units()
    assert recording.sum() == 12                      # round(0.75 * 16) channels record units
    assert np.array_equal(units(session=3), recording)  # the array's tips do not move between days
    sim = NerveSimulator.from_config(SimulatorConfig(seconds=2.0, seed=7, electrode_yield=0.75, emg_uv=3.0))
    spikes = sim._spikes(0, sim.config.n_samples)
    assert np.all(spikes[:, ~recording] == 0) and np.all(np.abs(spikes[:, recording]).max(axis=0) > 0)


@pytest.mark.parametrize("option, value", [("electrode_yield", 1.5), ("mirror_miss_prob", -0.1),
                                           ("mirror_cocontraction", 2.0), ("mirror_effort_sd", -1.0),
                                           ("mirror_timing_sd_s", 5.0)])
def test_confound_options_out_of_range_are_usage_errors(option, value):
    with pytest.raises(UsageError):
        SimulatorConfig(seconds=1.0, **{option: value})
