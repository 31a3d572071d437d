// prism-otel report: draws the inlined data with uPlot. Every plot element gets data-points (points given)
// and data-ink-<series> (pixels of that series' colour drawn inside the plot area), so a headless browser
// can check that the plots drew from the data (tests/report/test_report.py).
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var COL = { obs: [127, 140, 141], exp: [41, 128, 222], anom: [231, 76, 60], inc: "rgba(243,156,18,0.16)" };
  var STAGE_COLORS = ["#2e86de", "#27ae60", "#e67e22", "#8e44ad", "#c0392b", "#16a085", "#d35400", "#2c3e50", "#7f8c8d", "#f1c40f"];
  function rgb(c) { return "rgb(" + c.join(",") + ")"; }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d === undefined ? 2 : d); }
  function when(s) { return new Date((D.t0_unix_s + s) * 1000).toLocaleTimeString(); }
  function width(node) { return Math.max(400, (node.clientWidth || 1200) - 10); }

  function inkHook(node, colors) {
    // uPlot draws after construction returns: measure in its draw hook (each redraw refreshes the counts)
    return function (u) { ink(u, node, colors); };
  }

  function ink(u, node, colors) {
    // count pixels of each series colour inside the plotting area (the canvas is in device pixels)
    try {
      var c = u.ctx.canvas, b = u.bbox;
      var img = u.ctx.getImageData(b.left, b.top, b.width, b.height).data;
      for (var key in colors) {
        var t = colors[key], n = 0;
        for (var i = 0; i < img.length; i += 4) {
          if (img[i + 3] > 200 && Math.abs(img[i] - t[0]) < 28 && Math.abs(img[i + 1] - t[1]) < 28 && Math.abs(img[i + 2] - t[2]) < 28) n++;
        }
        node.setAttribute("data-ink-" + key, String(n));
      }
    } catch (e) { node.setAttribute("data-ink-error", String(e)); }
  }

  function shadeIncidents(u) {
    var ctx = u.ctx, b = u.bbox;
    ctx.save();
    ctx.fillStyle = COL.inc;
    D.incidents.forEach(function (inc) {
      var x0 = u.valToPos(inc.t_start, "x", true), x1 = u.valToPos(Math.max(inc.t_end, inc.t_start + 0.05), "x", true);
      x0 = Math.max(b.left, x0); x1 = Math.min(b.left + b.width, x1);
      if (x1 > x0) ctx.fillRect(x0, b.top, x1 - x0, b.height);
    });
    ctx.restore();
  }

  function cards() {
    var c = document.getElementById("cards");
    var anom = 0, judged = 0;
    for (var p in D.phases) { anom += D.phases[p].anomalous; judged += D.phases[p].judged; }
    [["duration", fmt(D.span_s, 1) + " s"], ["steps", D.steps], ["judged steps", judged + " (" + fmt(100 * judged / Math.max(1, D.steps), 1) + "%)"],
     ["anomalous steps", anom], ["incidents", D.incidents.length], ["requests", D.requests]].forEach(function (kv, i) {
      var card = el("div", { "class": "card" + ((i === 4 && D.incidents.length) ? " bad" : "") });
      card.appendChild(el("b", {}, String(kv[1]))); card.appendChild(el("span", {}, kv[0])); c.appendChild(card);
    });
    document.getElementById("subtitle").textContent = "from " + when(0) + " for " + fmt(D.span_s, 1) + " s; instances: " + D.instances.join(", ");
    document.getElementById("inputs").textContent = "Inputs: " + D.files.join(", ") +
      (D.skipped_n ? " (" + D.skipped_n + " unreadable lines skipped: " + D.skipped.join("; ") + ")" : "");
  }

  function latency() {
    var host = document.getElementById("latency-plots");
    Object.keys(D.phases).forEach(function (ph) {
      var P = D.phases[ph];
      host.appendChild(el("div", { "class": "note" }, ph + ": " + P.steps + " steps" + (P.thinned > 1 ? " (every anomalous one and 1 in " + P.thinned + " of the others shown)" : "") +
        ", p50 " + fmt(P.p50_ms) + " ms, p99 " + fmt(P.p99_ms) + " ms, " + P.anomalous + " anomalous"));
      var node = el("div", { "class": "plot latency-plot", "data-phase": ph });
      host.appendChild(node);
      var anomY = P.ms.map(function (v, i) { return P.anom[i] ? v : null; });
      var pts = function (color, size) { return { show: true, size: size, fill: color, stroke: color, width: 0 }; };
      new uPlot({
        width: width(host), height: 260,
        scales: { x: { time: false }, y: { distr: 3 } },
        axes: [{ label: "seconds since start", grid: { show: false } }, { label: "ms", grid: { show: false } }],
        series: [{},
          { label: "observed", stroke: rgb(COL.obs), width: 0, paths: function () { return null; }, points: pts(rgb(COL.obs), 3) },
          { label: "expected", stroke: rgb(COL.exp), width: 2, spanGaps: false, points: { show: false } },
          { label: "anomalous", stroke: rgb(COL.anom), width: 0, paths: function () { return null; }, points: pts(rgb(COL.anom), 5) }],
        hooks: { drawClear: [shadeIncidents], draw: [inkHook(node, { obs: COL.obs, exp: COL.exp, anom: COL.anom })] }
      }, [P.t, P.ms, P.exp, anomY], node);
      node.setAttribute("data-points", String(P.ms.filter(function (v) { return v !== null; }).length));
      node.setAttribute("data-expected-points", String(P.exp.filter(function (v) { return v !== null; }).length));
      node.setAttribute("data-anomalous-points", String(anomY.filter(function (v) { return v !== null; }).length));
    });
  }

  function incidents() {
    document.getElementById("incident-source").textContent = D.incidents.length ?
      D.incidents.length + " incident(s), " + D.incident_source + "." : "No incident: no sustained run of anomalous steps (" + D.incident_source + ").";
    if (!D.incidents.length) return;
    var t = el("table", { id: "incident-rows" });
    var head = el("tr");
    ["#", "start", "duration", "root cause", "evidence", "peak", "anomalous / judged steps", "phases", "stages hit", "closed"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
    t.appendChild(head);
    D.incidents.forEach(function (inc) {
      var tr = el("tr", { "class": "incident-row" });
      var ev = Object.keys(inc.evidence || {}).map(function (k) { return k + "=" + inc.evidence[k]; }).join(", ");
      var stages = (inc.stages || []).map(function (s) { return s.stage + " " + fmt(s.normal_ms) + "→" + fmt(s.mean_ms) + " ms"; }).join("; ");
      var peak = inc.peak && inc.peak.duration_ms ? fmt(inc.peak_ratio, 1) + "x (" + fmt(inc.peak.duration_ms, 1) + " ms vs " + fmt(inc.peak.expected_ms, 1) + ")" : fmt(inc.peak_ratio, 1) + "x";
      [String(inc.number), when(inc.t_start) + " (+" + fmt(inc.t_start, 1) + " s)", fmt(inc.duration_s, 1) + " s", null, ev || "–", peak,
       inc.steps_affected + " / " + inc.steps_judged, Object.keys(inc.phases || {}).join(", "), stages || "–",
       inc.state === "open" ? "open" : (inc.close_reason || "closed")].forEach(function (v, i) {
        var td = el("td");
        if (i === 3) td.appendChild(el("span", { "class": "cause" }, inc.root_cause || "unknown"));
        else if (i === 4) { td.className = "ev"; td.textContent = v; }
        else td.textContent = v;
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    document.getElementById("incident-table").appendChild(t);
  }

  function stages() {
    var S = D.stages, names = Object.keys(S.shares), node = document.getElementById("stage-plot");
    var tbl = el("table"), hr = el("tr");
    hr.appendChild(el("th", {}, "stage")); hr.appendChild(el("th", { "class": "num" }, "share of all step time"));
    tbl.appendChild(hr);
    names.forEach(function (n) { var tr = el("tr"); tr.appendChild(el("td", {}, n)); tr.appendChild(el("td", { "class": "num" }, fmt(100 * S.totals[n], 1) + "%")); tbl.appendChild(tr); });
    document.getElementById("stage-table").appendChild(tbl);
    if (!names.length) { node.textContent = "No stage spans in the inputs."; return; }
    var data = [S.t], series = [{}], bands = [], acc = S.t.map(function () { return 0; });
    names.forEach(function (n, i) {
      acc = acc.map(function (a, j) { return S.shares[n][j] === null ? a : a + S.shares[n][j]; });
      data.push(acc.map(function (a, j) { return S.empty[j] ? null : Math.round(a * 10000) / 100; }));
      var c = STAGE_COLORS[i % STAGE_COLORS.length];
      var s = { label: n, stroke: c, width: 1, points: { show: false } };
      if (i === 0) s.fill = c + "99"; else bands.push({ series: [i + 1, i], fill: c + "99" });
      series.push(s);
    });
    var first = STAGE_COLORS[0];
    new uPlot({ width: width(node.parentNode), height: 240, scales: { x: { time: false }, y: { auto: false, range: [0, 100] } },
      axes: [{ label: "seconds since start" }, { label: "% of step time (stacked)" }], series: series, bands: bands,
      hooks: { draw: [inkHook(node, { first: [parseInt(first.substr(1, 2), 16), parseInt(first.substr(3, 2), 16), parseInt(first.substr(5, 2), 16)] })] } },
      data, node);
    node.setAttribute("data-points", String(names.length * S.t.length));
    node.setAttribute("data-stages", String(names.length));
  }

  function requests() {
    var p = D.percentiles, t = el("table"), hr = el("tr");
    ["", "requests", "p50", "p90", "p99", "max"].forEach(function (h, i) { hr.appendChild(el("th", { "class": i > 1 ? "num" : "" }, h)); });
    t.appendChild(hr);
    [["time to first token (ms)", "ttft_ms"], ["time per output token (ms)", "tpot_ms"], ["request duration (ms)", "duration_ms"]].forEach(function (r) {
      var tr = el("tr"); tr.appendChild(el("td", {}, r[0])); tr.appendChild(el("td", {}, String(p[r[1]].n)));
      ["p50", "p90", "p99", "max"].forEach(function (q) { tr.appendChild(el("td", { "class": "num" }, fmt(p[r[1]][q]))); });
      t.appendChild(tr);
    });
    document.getElementById("pct-table").appendChild(t);
    var T = D.throughput, n1 = document.getElementById("tput-plot");
    new uPlot({ width: width(n1.parentNode), height: 220, scales: { x: { time: false } },
      axes: [{ label: "seconds since start" }, { label: "requests/s", scale: "y" }, { label: "tokens/s", scale: "tok", side: 1, grid: { show: false } }],
      series: [{}, { label: "requests/s", stroke: rgb(COL.exp), width: 2 }, { label: "tokens/s", stroke: "#27ae60", width: 1, scale: "tok" }],
      hooks: { draw: [inkHook(n1, { requests: COL.exp })] } },
      [T.t, T.requests_per_s, T.tokens_per_s], n1);
    n1.setAttribute("data-points", String(T.t.length));
    var n2 = document.getElementById("ttft-plot");
    if (!D.ttft.t.length) { n2.textContent = "No request spans in the inputs."; n2.setAttribute("data-points", "0"); return; }
    new uPlot({ width: width(n2.parentNode), height: 220, scales: { x: { time: false }, y: { distr: 3 } },
      axes: [{ label: "seconds since start" }, { label: "ms" }],
      series: [{}, { label: "TTFT", stroke: rgb(COL.anom), width: 0, paths: function () { return null; }, points: { show: true, size: 4, fill: rgb(COL.anom), width: 0 } }],
      hooks: { draw: [inkHook(n2, { ttft: COL.anom })] } },
      [D.ttft.t, D.ttft.ms], n2);
    n2.setAttribute("data-points", String(D.ttft.t.length));
  }

  function detector() {
    var t = el("table"), hr = el("tr");
    ["phase", "steps", "judged", "not judged", "anomalous", "first judged", "baseline"].forEach(function (h, i) { hr.appendChild(el("th", { "class": i && i < 5 ? "num" : "" }, h)); });
    t.appendChild(hr);
    Object.keys(D.phases).forEach(function (ph) {
      var P = D.phases[ph], tr = el("tr", { "class": "detector-row" });
      [ph, P.steps, P.judged, P.unjudged, P.anomalous, P.first_judged_s === null ? "never" : "+" + fmt(P.first_judged_s, 1) + " s", P.baseline].forEach(function (v, i) {
        tr.appendChild(el("td", { "class": i && i < 5 ? "num" : "" }, String(v)));
      });
      t.appendChild(tr);
    });
    document.getElementById("detector-table").appendChild(t);
    var note = el("p", { "class": "note" }, "A step that was not judged is not known to be healthy: the detector had no model for its phase yet.");
    document.getElementById("detector-table").appendChild(note);
  }

  [cards, latency, incidents, stages, requests, detector].forEach(function (f) {
    try { f(); } catch (e) { document.body.setAttribute("data-error", (document.body.getAttribute("data-error") || "") + f.name + ": " + e + "; "); }
  });
  document.body.setAttribute("data-ready", "1");
})();
