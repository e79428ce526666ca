"""The displays of ``neurohand collect``: the web page in a real headless browser (Debian's Chromium),
its server's rules, and the terminal view with and without a terminal."""
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from neurohand.deploy.collect import schedule as sched
from neurohand.deploy.collect.display_terminal import TerminalDisplay
from neurohand.deploy.collect.display_web import WebDisplay
from neurohand.deploy.collect.protocol import Protocol
from neurohand.deploy.collect.session import CollectSession, Settings

from test_collect_rig import SHORT, ChipThread, FakeGlove, Patient, Signals, noise_source
from test_collect_session import CALIBRATION

CHROMIUM = "/usr/bin/chromium"
WEB_PROTOCOL = dict(SHORT, hold_s=1.5, rest_s=1.0, lead_in_s=0.5)


def state(label="index", elapsed=1.5, posture=(0, 1, 0, 0, 0)):
    return {"phase": "trials", "elapsed_s": elapsed, "protocol": "short",
            "step": {"index": 1, "kind": "move", "label": label, "posture": list(posture), "movement": 2,
                     "repetition": 1, "trial": 0, "left_s": 1.0, "duration_s": 3.0, "start_s": 0.5, "cue": 2},
            "next": {"label": "rest", "kind": "rest"}, "progress": {"done": 1, "total": 4, "phase_total_s": 9.0},
            "fingers": ["thumb", "index", "middle", "ring", "little"], "glove": [0.1, 0.7, 0.1, 0.0, 0.0],
            "decoded": None, "counters": {"chip_samples_missing": 20, "glove_lost": 1, "glove_rows_held": 3},
            "channels": {"rms_uv": [3.5, None], "saturation": [0.0, None], "trace_min_uv": [[-5, -4], []],
                         "trace_max_uv": [[5, 6], []]}}


def get(url, host=None):
    request = urllib.request.Request(url)
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), response.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), None


def test_the_server_listens_on_loopback_only_and_serves_only_its_files():
    web = WebDisplay(0).start()
    try:
        assert web._server.server_address[0] == "127.0.0.1"
        web.show(state())
        status, body, kind = get(web.url + "state")
        assert status == 200 and kind == "application/json"
        document = json.loads(body.decode("utf-8"))
        assert document["step"]["label"] == "index" and document["version"] == 1
        status, body, _ = get(web.url)
        assert status == 200 and b"/static/collect.js" in body and b"http" not in body.replace(b"http-equiv", b"")
        for name in ("collect.js", "hand.js", "collect.css"):
            assert get(web.url + "static/" + name)[0] == 200
        assert get(web.url + "static/../display_web.py")[0] == 404
        assert get(web.url + "static/index.html")[0] == 404
        # Another site's page reaching us through a name that resolves here (DNS rebinding) is refused.
        assert get(web.url + "state", host="attacker.example:{}".format(web.port))[0] == 403
    finally:
        web.close()


def test_the_page_needs_nothing_from_the_network():
    from neurohand.deploy.collect.display_web import WEB_DIR
    for name in os.listdir(WEB_DIR):
        with open(os.path.join(WEB_DIR, name), encoding="utf-8") as handle:
            text = handle.read()
        assert not re.search(r"(src|href)\s*=\s*[\"'](https?:)?//", text), name
        assert "import(" not in text and "cdn" not in text.lower(), name


def dump_dom(url, budget_ms=1500):
    profile = tempfile.mkdtemp(prefix="neurohand-chromium-")
    try:
        result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                 "--disable-background-networking", "--no-first-run", "--user-data-dir=" + profile,
                                 "--virtual-time-budget={}".format(budget_ms), "--dump-dom", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def body_attributes(dom):
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def svg_flexion(dom, svg_id):
    match = re.search(r'<svg id="{}"[^>]*data-flexion="([^"]*)"'.format(svg_id), dom)
    return [float(v) for v in match.group(1).split(",")] if match and match.group(1) else None


@pytest.fixture
def chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("REQUIRE_CHROMIUM is set but {} is absent".format(CHROMIUM))
        pytest.skip("{} is absent (Debian package chromium)".format(CHROMIUM))
    return CHROMIUM


def test_the_page_in_a_browser_follows_the_session_live(chromium, tmp_path):
    chip = ChipThread(noise_source())
    web = WebDisplay(0).start()
    patient = Patient()
    protocol = Protocol.from_config(WEB_PROTOCOL)
    session = CollectSession(Settings(chip.path, "serial:fake", str(tmp_path / "s.nh"), protocol,
                                      open_glove=lambda spec, **o: FakeGlove(patient),
                                      displays=[patient, web], calibration=CALIBRATION))
    outcome = {}
    signals = Signals()
    runner = threading.Thread(target=lambda: outcome.update(result=session.run(signals)), daemon=True)
    shown_at = []
    original_show = web.show

    def show(state):
        shown_at.append(time.monotonic())
        original_show(state)
    web.show = show
    try:
        runner.start()
        assert_live = []
        for _ in range(2):
            launched = time.monotonic()
            dom = dump_dom(web.url)
            done = time.monotonic()
            assert_live.append((launched, done, dom))
        signals.reason = "SIGINT"
        runner.join(30.0)
    finally:
        chip.stop()
        web.close()
    assert outcome["result"].stop_reason in ("complete", "SIGINT")
    plan = sched.Schedule(sched.trial_steps(protocol))
    versions = []
    for launched, done, dom in assert_live:
        body = body_attributes(dom)
        version = int(body["version"])
        versions.append(version)
        assert body["phase"] == "trials"
        # The state on the page was shown while the browser ran: it polled, and it kept up.
        assert launched <= shown_at[version - 1] <= done
        step, _ = plan.at(float(body["elapsed"]))
        # The cue on the page is the protocol's cue at the session time the page shows.
        assert body["cue"] == step.label and int(body["step-index"]) == plan.steps.index(step)
        assert ">{}</div>".format(step.label) in dom
        assert svg_flexion(dom, "hand-target") == [float(v) for v in step.posture]
        glove = svg_flexion(dom, "hand-glove")
        assert glove is not None and len(glove) == 5
        assert len(re.findall(r'class="channel( saturated)?"', dom)) == 4
        assert len(re.findall(r'<rect class="finger" ', dom)) == 10          # two hands, five fingers each
    assert versions[1] > versions[0]


def test_the_terminal_view_without_a_terminal_writes_one_line_per_cue():
    stream = io.StringIO()
    display = TerminalDisplay(stream)
    assert not display.fullscreen
    display.show(state("index", 1.0))
    display.show(state("index", 1.1))
    second = state("rest", 2.0)
    second["step"]["index"], second["step"]["kind"] = 2, "rest"
    display.show(second)
    display.close()
    lines = stream.getvalue().splitlines()
    cues = [line for line in lines if not line.startswith("[status]")]
    assert len(cues) == 2 and "index" in cues[0] and "rest" in cues[1]
    assert "\x1b" not in stream.getvalue()
    assert any(line.startswith("[status] glove th=0.10 in=0.70") for line in lines)


def test_the_terminal_view_on_a_terminal_draws_full_screen_and_restores_it():
    stream = io.StringIO()
    display = TerminalDisplay(stream, fullscreen=True)
    display.show(state("index", 1.0))
    display.close()
    text = stream.getvalue()
    assert text.startswith("\x1b[?1049h") and text.endswith("\x1b[?25h\x1b[?1049l")
    assert "INDEX" in text and "next: rest" in text and "ch00" in text and "ch01" in text
    assert "lost: chip 20 samples, glove 1 samples, 3 label rows held" in text
    index_line = next(line for line in text.split("\n") if line.strip().startswith("index "))
    assert "0.70" in index_line and "|" in index_line      # the live value, and the target marked
