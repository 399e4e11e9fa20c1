// Live plots with uPlot: a device's stream (/stream/devices/{id}) or a run's data
// (/stream/tasks/{id}, and the data a finished run emitted). Each [data-plot] element keeps
// data-points = the number of points received so far. Drawing happens at most once per
// animation frame; a window (seconds of a stream, or points of a run) bounds what is kept.
(function () {
  "use strict";

  var MAX_KEPT = 400000;  // points per series, whatever the window says
  var bench = function () { return window.labdBench === true; };

  function isNumberArray(value) {
    return Array.isArray(value) && value.length > 0 && (typeof value[0] === "number" || value[0] === null);
  }

  function is2D(value) { return Array.isArray(value) && value.length > 0 && isNumberArray(value[0]); }

  function eventTime(event) {
    var t = event && event.timestamp ? Date.parse(event.timestamp) : NaN;
    return isNaN(t) ? Date.now() : t;
  }

  // A payload as {x: [...], series: {name: [...]}}: blocks (arrays) spread over their sample
  // times, scalars and dicts of scalars at the event's time.
  function pointsOf(payload, timeSeconds, state) {
    var out = { x: [], series: {} };
    var arrays = {};
    if (isNumberArray(payload)) arrays.value = payload;
    else if (is2D(payload)) payload.forEach(function (row, i) { arrays["value[" + i + "]"] = row; });
    else if (payload && typeof payload === "object") {
      Object.keys(payload).forEach(function (key) {
        var v = payload[key];
        if (isNumberArray(v)) arrays[key] = v;
        else if (is2D(v)) v.forEach(function (row, i) { arrays[key + "[" + i + "]"] = row; });
      });
    }
    var names = Object.keys(arrays);
    if (names.length) {
      var n = arrays[names[0]].length;
      var rate = payload && typeof payload.rate === "number" && payload.rate > 0 ? payload.rate : null;
      var t0 = payload && typeof payload.t0 === "number" ? payload.t0 : null;
      var start = t0 !== null ? t0 : (state.lastX !== null && rate === null ? state.lastX : timeSeconds);
      var step = rate ? 1 / rate : (state.lastX !== null ? Math.max((timeSeconds - state.lastX) / n, 1e-9) : 1e-3);
      for (var i = 0; i < n; i++) out.x.push(start + (t0 !== null || rate ? i * step : (i + 1) * step));
      names.forEach(function (name) { out.series[name] = arrays[name].slice(0, n); });
      return out;
    }
    out.x.push(timeSeconds);
    if (typeof payload === "number") out.series.value = [payload];
    else if (payload && typeof payload === "object") {
      Object.keys(payload).forEach(function (key) {
        if (typeof payload[key] === "number") out.series[key] = [payload[key]];
      });
    }
    return out;
  }

  function Plot(el) {
    this.el = el;
    this.mode = el.dataset.x === "time" ? "time" : "rows";  // rows: a run's emitted values
    this.x = []; this.cols = {}; this.rows = [];
    this.lastX = null; this.origin = null;
    this.points = 0; this.paused = false; this.hidden = {};
    this.pendingTimes = []; this.frameQueued = false;
    this.stats = { lags: [], frames: 0, events: 0, started: performance.now() };
    this.windowValue = this.mode === "time" ? 5 : 0;
    this.xField = null;
    this.buildControls();
    el.labdPlot = this;
  }

  Plot.prototype.buildControls = function () {
    var el = this.el, self = this;
    var label = el.dataset.label || "Plot";
    var id = "plot" + Math.random().toString(36).slice(2, 8);
    el.innerHTML = "";
    var bar = document.createElement("div"); bar.className = "plot-controls";
    var windows = this.mode === "time" ? [[1, "1 s"], [5, "5 s"], [10, "10 s"], [30, "30 s"], [60, "60 s"]]
      : [[0, "all points"], [100, "last 100"], [1000, "last 1000"]];
    var wl = document.createElement("label"); wl.htmlFor = id + "-window"; wl.textContent = "Window";
    var ws = document.createElement("select"); ws.id = id + "-window";
    windows.forEach(function (w) {
      var o = document.createElement("option"); o.value = String(w[0]); o.textContent = w[1];
      if (w[0] === self.windowValue) o.selected = true; ws.appendChild(o);
    });
    ws.addEventListener("change", function () { self.windowValue = Number(ws.value); self.trim(); self.schedule(); });
    var pause = document.createElement("button"); pause.type = "button"; pause.className = "small";
    pause.textContent = "Pause plot"; pause.setAttribute("aria-pressed", "false");
    pause.addEventListener("click", function () {
      self.paused = !self.paused;
      pause.textContent = self.paused ? "Resume plot" : "Pause plot";
      pause.setAttribute("aria-pressed", String(self.paused));
      if (!self.paused) self.schedule();
    });
    bar.append(wl, ws, pause);
    if (this.mode === "rows") {
      var xl = document.createElement("label"); xl.htmlFor = id + "-x"; xl.textContent = "X axis";
      this.xSelect = document.createElement("select"); this.xSelect.id = id + "-x";
      this.xSelect.addEventListener("change", function () {
        self.xChosen = true; self.xField = self.xSelect.value || null; self.rebuildRows();
      });
      bar.append(xl, this.xSelect);
    }
    this.fieldBox = document.createElement("span"); this.fieldBox.className = "plot-fields";
    this.fieldBox.setAttribute("role", "group"); this.fieldBox.setAttribute("aria-label", "Fields shown");
    bar.append(this.fieldBox);
    this.status = document.createElement("span"); this.status.className = "plot-status";
    this.status.setAttribute("role", "status");
    bar.append(this.status);
    this.canvas = document.createElement("div"); this.canvas.className = "canvas";
    this.canvas.setAttribute("role", "img"); this.canvas.setAttribute("aria-label", label);
    el.append(bar, this.canvas);
  };

  Plot.prototype.fieldNames = function () { return Object.keys(this.cols); };

  Plot.prototype.syncFields = function () {
    var self = this, names = this.fieldNames();
    var shown = Array.prototype.map.call(this.fieldBox.querySelectorAll("input"), function (i) { return i.value; });
    if (shown.join("\u0000") === names.join("\u0000")) return false;
    this.fieldBox.innerHTML = "";
    names.forEach(function (name, i) {
      var box = document.createElement("input"); box.type = "checkbox"; box.value = name;
      box.id = self.canvas.parentNode.querySelector("select").id + "-f" + i;
      box.checked = !self.hidden[name];
      box.addEventListener("change", function () { self.hidden[name] = !box.checked; self.rebuild(); });
      var lab = document.createElement("label"); lab.htmlFor = box.id; lab.textContent = name;
      self.fieldBox.append(box, lab);
    });
    return true;
  };

  // -- stream mode: x is seconds since the first point -----------------------------------------
  Plot.prototype.addPayload = function (payload, event) {
    var now = eventTime(event);
    if (typeof payload === "number" && this.cols.value && this.fieldNames().length === 1) {
      // The common scalar stream: one number per event, no allocation.
      this.x.push(now / 1000 - this.origin); this.cols.value.push(payload);
      this.lastX = now / 1000; this.points += 1; this.stats.events += 1;
      this.el.dataset.points = String(this.points);
      if (bench()) this.pendingTimes.push(now);
      if (this.x.length > MAX_KEPT * 2) this.trim();
      this.schedule();
      return;
    }
    var part = pointsOf(payload, now / 1000, this);
    if (!part.x.length) return;
    if (this.origin === null) this.origin = part.x[0];
    var self = this, n = part.x.length, names = Object.keys(part.series);
    var before = this.x.length;
    names.forEach(function (name) {
      if (!self.cols[name]) { self.cols[name] = new Array(before).fill(null); }
    });
    for (var i = 0; i < n; i++) this.x.push(part.x[i] - this.origin);
    this.fieldNames().forEach(function (name) {
      var src = part.series[name], col = self.cols[name];
      for (var j = 0; j < n; j++) col.push(src ? src[j] : null);
    });
    this.lastX = part.x[n - 1];
    this.points += n;
    this.el.dataset.points = String(this.points);
    this.stats.events += 1;
    if (bench()) this.pendingTimes.push(now);
    if (this.x.length > MAX_KEPT * 2) this.trim();  // otherwise once per frame, in draw()
    this.schedule();
  };

  Plot.prototype.trim = function () {
    if (this.mode !== "time" || !this.x.length) return;
    var limit = this.x[this.x.length - 1] - this.windowValue;
    var cut = 0;
    while (cut < this.x.length && this.x[cut] < limit) cut++;
    cut = Math.max(cut, this.x.length - MAX_KEPT);
    if (cut > 0) {
      this.x.splice(0, cut);
      var self = this;
      this.fieldNames().forEach(function (name) { self.cols[name].splice(0, cut); });
    }
  };

  // -- rows mode: a run's emitted values, x = a numeric field or the point number -------------
  Plot.prototype.addRow = function (value, event) {
    this.rows.push(value);
    this.points += Array.isArray(value) ? value.length : 1;
    this.el.dataset.points = String(this.points);
    this.stats.events += 1;
    if (bench()) this.pendingTimes.push(eventTime(event));
    this.rebuildRows();
  };

  Plot.prototype.rebuildRows = function () {
    var rows = this.windowValue > 0 ? this.rows.slice(-this.windowValue) : this.rows;
    var numeric = {};
    rows.forEach(function (row) {
      if (row && typeof row === "object" && !Array.isArray(row)) {
        Object.keys(row).forEach(function (k) { if (typeof row[k] === "number") numeric[k] = true; });
      }
    });
    var fields = Object.keys(numeric);
    var last = rows[rows.length - 1];
    if (!fields.length && last !== undefined && typeof last !== "number") {
      this.traceOf(last);  // a run that emits traces (arrays): the latest one against its index
      return;
    }
    this.syncXOptions(fields);
    var xField = this.xField;
    var x = [], cols = {};
    var self = this;
    if (!fields.length) {  // numbers or arrays: point number against value(s)
      cols.value = [];
      rows.forEach(function (row, i) {
        if (typeof row === "number") { x.push(i + 1); cols.value.push(row); }
      });
    } else {
      fields.forEach(function (f) { if (f !== xField) cols[f] = []; });
      rows.forEach(function (row, i) {
        x.push(xField ? row[xField] : i + 1);
        Object.keys(cols).forEach(function (f) { cols[f].push(typeof row[f] === "number" ? row[f] : null); });
      });
    }
    self.x = x; self.cols = cols;
    this.schedule();
  };

  Plot.prototype.traceOf = function (value) {
    var part = pointsOf(value, 0, { lastX: null });
    var names = Object.keys(part.series), n = part.x.length;
    var x = [], cols = {};
    for (var i = 0; i < n; i++) x.push(i);
    names.forEach(function (name) { cols[name] = part.series[name]; });
    if (this.xSelect) this.syncXOptions([]);
    this.x = x; this.cols = cols;
    this.schedule();
  };

  Plot.prototype.syncXOptions = function (fields) {
    if (!this.xSelect) return;
    var wanted = [""].concat(fields);
    var suggested = this.xChosen ? this.xField : (fields.length >= 2 ? monotonicField(this.rows, fields) : null);
    var have = Array.prototype.map.call(this.xSelect.options, function (o) { return o.value; });
    if (have.join("\u0000") === wanted.join("\u0000") && suggested === this.xField) return;
    this.xField = suggested;
    var self = this;
    this.xSelect.innerHTML = "";
    wanted.forEach(function (f) {
      var o = document.createElement("option"); o.value = f; o.textContent = f || "point number";
      if ((f || null) === self.xField) o.selected = true;
      self.xSelect.appendChild(o);
    });
  };

  // The x axis a run's rows suggest: the first field that only grows (or only shrinks),
  // like a sweep's wavelength; null (the point number) if there is none.
  function monotonicField(rows, fields) {
    for (var f = 0; f < fields.length; f++) {
      var name = fields[f], up = true, down = true, last = null;
      for (var i = 0; i < rows.length && (up || down); i++) {
        var v = rows[i] && rows[i][name];
        if (typeof v !== "number") { up = down = false; break; }
        if (last !== null) { if (v <= last) up = false; if (v >= last) down = false; }
        last = v;
      }
      if ((up || down) && rows.length > 1) return name;
    }
    return null;
  }

  // -- drawing ----------------------------------------------------------------------------------
  Plot.prototype.schedule = function () {
    if (this.frameQueued || this.paused) return;
    this.frameQueued = true;
    var self = this;
    requestAnimationFrame(function () { self.frameQueued = false; self.draw(); });
  };

  Plot.prototype.decimated = function () {
    var names = this.fieldNames().filter(function (n) { return !this.hidden[n]; }, this);
    var n = this.x.length, width = Math.max(this.canvas.clientWidth, 200);
    var buckets = width * 2;
    if (n <= buckets * 2 || this.mode !== "time") {
      return [this.x].concat(names.map(function (k) { return this.cols[k]; }, this));
    }
    // min/max per bucket keeps every peak visible at a fraction of the points
    var xs = [], outs = names.map(function () { return []; });
    var size = n / buckets;
    for (var b = 0; b < buckets; b++) {
      var from = Math.floor(b * size), to = Math.min(n, Math.floor((b + 1) * size));
      if (to <= from) continue;
      xs.push(this.x[from], this.x[to - 1]);
      for (var s = 0; s < names.length; s++) {
        var col = this.cols[names[s]], lo = Infinity, hi = -Infinity;
        for (var i = from; i < to; i++) { var v = col[i]; if (v !== null) { if (v < lo) lo = v; if (v > hi) hi = v; } }
        outs[s].push(lo === Infinity ? null : lo, hi === -Infinity ? null : hi);
      }
    }
    return [xs].concat(outs);
  };

  var COLORS = ["#1d4ed8", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

  Plot.prototype.rebuild = function () {
    if (this.uplot) { this.uplot.destroy(); this.uplot = null; }
    this.schedule();
  };

  Plot.prototype.draw = function () {
    if (!window.uPlot) return;
    this.trim();
    var changed = this.syncFields();
    var data = this.decimated();
    var names = this.fieldNames().filter(function (n) { return !this.hidden[n]; }, this);
    var key = names.join("\u0000");
    if (changed || !this.uplot || this.seriesKey !== key) {
      if (this.uplot) this.uplot.destroy();
      var width = Math.max(this.canvas.clientWidth, 200);
      var xLabel = this.mode === "time" ? "time (s)" : (this.xField || "point number");
      var opts = {
        width: width, height: 240, legend: { show: false }, cursor: { show: true },
        scales: { x: { time: false } },
        axes: [{ label: xLabel }, {}],
        series: [{ label: xLabel }].concat(names.map(function (name, i) {
          return { label: name, stroke: COLORS[i % COLORS.length], width: 1, spanGaps: false, points: { show: this.mode !== "time" } };
        }, this)),
      };
      this.uplot = new uPlot(opts, data, this.canvas);
      this.seriesKey = key;
    } else {
      this.uplot.setData(data);
    }
    this.stats.frames += 1;
    this.status.textContent = this.points + " points" + (this.paused ? " (paused)" : "");
    if (bench() && this.pendingTimes.length) {
      var times = this.pendingTimes, stats = this.stats;
      this.pendingTimes = [];
      // The next frame starts once these pixels were painted.
      requestAnimationFrame(function () {
        var painted = performance.timeOrigin + performance.now();
        for (var i = 0; i < times.length; i++) stats.lags.push(painted - times[i]);
        if (stats.lags.length > 500000) stats.lags.splice(0, stats.lags.length - 500000);
      });
    }
  };

  Plot.prototype.resize = function () {
    if (this.uplot) this.uplot.setSize({ width: Math.max(this.canvas.clientWidth, 200), height: 240 });
  };

  // -- sources ------------------------------------------------------------------------------------
  Plot.prototype.connect = function () {
    var url = this.el.dataset.source;
    if (!url || this.source) return;
    var self = this;
    var source = new EventSource(url);
    this.source = source;
    this.status.textContent = "connecting…";
    source.addEventListener("device_data", function (m) {
      var event = JSON.parse(m.data); self.addPayload(event.payload, event);
    });
    source.addEventListener("data", function (m) {
      var event = JSON.parse(m.data);
      if (self.mode === "time") self.addPayload(event.data, event); else self.addRow(event.data, event);
    });
    ["progress", "state", "finished", "parameter"].forEach(function (name) {
      source.addEventListener(name, function (m) {
        if (window.labd) window.labd.onTaskEvent(name, JSON.parse(m.data));
        if (name === "finished") { source.close(); self.source = null; }
      });
    });
    source.addEventListener("stream_error", function (m) { self.status.textContent = "a stream item could not be encoded"; });
    source.onopen = function () { self.el.dispatchEvent(new CustomEvent("labd:stream-open", { bubbles: true })); };
    // The server ends a stream when it stops (or the server does); an EventSource would
    // reconnect by itself, and for a device that means starting its stream again: never.
    source.onerror = function () { self.disconnect("stream ended"); };
    window.addEventListener("pagehide", function () { source.close(); });
  };

  Plot.prototype.disconnect = function (why) {
    if (!this.source) return;
    this.source.close();
    this.source = null;
    this.status.textContent = this.points + " points (" + why + ")";
    this.el.dispatchEvent(new CustomEvent("labd:stream-closed", { bubbles: true }));
  };

  function setUp(el) {
    if (el.labdPlot) return el.labdPlot;
    var plot = new Plot(el);
    var initial = el.parentNode.querySelector("script[data-plot-initial]");
    if (initial) {
      var rows = JSON.parse(initial.textContent || "[]");
      rows.forEach(function (row) { plot.addRow(row, null); });
    }
    if (el.dataset.autostart === "yes") plot.connect();
    return plot;
  }

  window.LabdPlot = {
    start: function (el) { setUp(el).connect(); },
    stop: function (el) { if (el.labdPlot) el.labdPlot.disconnect("stopped"); },
    get: function (el) { return el.labdPlot; },
  };

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-plot]").forEach(setUp);
    window.addEventListener("resize", function () {
      document.querySelectorAll("[data-plot]").forEach(function (el) { if (el.labdPlot) el.labdPlot.resize(); });
    });
  });
})();
