// Polls /state and draws the session: cue, countdown, target and glove hands, traces, progress.
// The body's data-* attributes mirror what is shown (tests read them).
"use strict";
(function () {
  var POLL_MS = 150;
  var byId = function (id) { return document.getElementById(id); };
  var channelsBuilt = 0;

  function text(id, value) { byId(id).textContent = value; }

  function traces(channels) {
    var list = byId("channel-list");
    var n = channels.rms_uv.length;
    if (channelsBuilt !== n) {
      list.innerHTML = "";
      for (var c = 0; c < n; c++) {
        var row = document.createElement("div");
        row.className = "channel";
        row.innerHTML = "<span>ch" + (c < 10 ? "0" : "") + c + "</span><span class='rms'></span>" +
          "<span class='sat'></span><svg viewBox='0 0 100 24' preserveAspectRatio='none'><polygon points=''/></svg>";
        list.appendChild(row);
      }
      channelsBuilt = n;
    }
    var rows = list.children;
    for (var i = 0; i < n; i++) {
      var row = rows[i];
      var rms = channels.rms_uv[i], sat = channels.saturation[i];
      row.querySelector(".rms").textContent = rms === null ? "-" : rms.toFixed(1) + " µV";
      row.querySelector(".sat").textContent = sat === null ? "-" : (100 * sat).toFixed(1) + " %";
      row.className = "channel" + (sat !== null && sat > 0.01 ? " saturated" : "");
      var lows = channels.trace_min_uv[i], highs = channels.trace_max_uv[i];
      var points = [];
      if (highs.length) {
        var top = 1e-9;
        for (var k = 0; k < highs.length; k++) { top = Math.max(top, Math.abs(highs[k]), Math.abs(lows[k])); }
        var step = 100 / Math.max(1, highs.length - 1);
        for (k = 0; k < highs.length; k++) { points.push((k * step).toFixed(1) + "," + (12 - 11 * highs[k] / top).toFixed(1)); }
        for (k = lows.length - 1; k >= 0; k--) { points.push((k * step).toFixed(1) + "," + (12 - 11 * lows[k] / top).toFixed(1)); }
      }
      row.querySelector("polygon").setAttribute("points", points.join(" "));
    }
  }

  function render(state) {
    var body = document.body;
    var step = state.step;
    body.setAttribute("data-phase", state.phase || "");
    body.setAttribute("data-version", state.version);
    body.setAttribute("data-elapsed", state.elapsed_s === undefined ? "" : state.elapsed_s);
    text("protocol", state.protocol ? "protocol " + state.protocol : "");
    text("phase", state.phase || "");
    text("elapsed", state.elapsed_s === undefined ? "" : state.elapsed_s.toFixed(1) + " s");
    var label = byId("cue-label");
    if (step) {
      label.textContent = step.label;
      label.className = "cue-label " + step.kind;
      body.setAttribute("data-cue", step.label);
      body.setAttribute("data-cue-kind", step.kind);
      body.setAttribute("data-step-index", step.index);
      text("countdown", step.left_s.toFixed(1) + " s");
      var done = step.duration_s ? 1 - step.left_s / step.duration_s : 1;
      byId("step-bar").style.width = (100 * Math.max(0, Math.min(1, done))).toFixed(1) + "%";
      NeurohandHand.draw(byId("hand-target"), step.posture);
    } else {
      label.textContent = state.phase === "starting" ? "waiting for the session" : "done";
      body.setAttribute("data-cue", "");
      body.setAttribute("data-step-index", "");
    }
    text("next", state.next ? "next: " + state.next.label : "");
    NeurohandHand.draw(byId("hand-glove"), state.glove);
    if (state.decoded) {
      byId("decoded-figure").hidden = false;
      NeurohandHand.draw(byId("hand-decoded"), state.decoded);
    }
    if (state.progress) {
      var p = state.progress;
      text("progress-text", state.phase === "calibration" ? "calibration" : p.done + " / " + p.total + " trials");
      byId("progress-bar").style.width = (p.total ? 100 * p.done / p.total : 0).toFixed(1) + "%";
    }
    if (state.counters) {
      var c = state.counters;
      text("counters", "lost: chip " + c.chip_samples_missing + " samples, glove " + c.glove_lost +
           " samples, " + c.glove_rows_held + " label rows held");
    }
    if (state.channels) { traces(state.channels); }
  }

  function poll() {
    var request = new XMLHttpRequest();
    request.open("GET", "/state", true);
    request.timeout = 2000;
    request.onload = function () {
      var link = byId("link");
      if (request.status === 200) {
        link.textContent = "live";
        link.className = "link";
        try { render(JSON.parse(request.responseText)); } catch (e) { link.textContent = "bad state: " + e; }
      }
      setTimeout(poll, POLL_MS);
    };
    request.onerror = request.ontimeout = function () {
      var link = byId("link");
      link.textContent = "connection lost (is the session still running?)";
      link.className = "link lost";
      setTimeout(poll, 1000);
    };
    request.send();
  }
  NeurohandHand.draw(byId("hand-target"), null);
  NeurohandHand.draw(byId("hand-glove"), null);
  poll();
})();
