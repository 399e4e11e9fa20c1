// labd dashboard: every request the page makes goes to this server's JSON API, with JSON
// bodies and the X-Labd-UI header (a signed-in browser's session cookie is accepted only with
// it). Forms are generated from JSON Schemas by the server; this turns them back into JSON.
(function () {
  "use strict";

  var body = document.body;
  var tokens = body.dataset.tokens === "yes";
  // Without tokens the principal is the X-Labd-Owner header: one name per browser tab,
  // so the lease this page takes is the one its commands are allowed under.
  var owner = tokens ? null : (sessionStorage.getItem("labd-owner") ||
    "browser-" + Math.random().toString(36).slice(2, 10));
  if (owner) sessionStorage.setItem("labd-owner", owner);

  function headers(extra) {
    var h = { "X-Labd-UI": "1", "Accept": "application/json" };
    if (owner) h["X-Labd-Owner"] = owner;
    return Object.assign(h, extra || {});
  }

  // fetch the JSON API; resolves to {ok, status, body} and never throws for HTTP errors.
  function api(method, url, payload, options) {
    var init = Object.assign({ method: method, headers: headers(), credentials: "same-origin" },
                             options || {});
    if (payload !== undefined) {
      init.body = JSON.stringify(payload);
      init.headers["Content-Type"] = "application/json";
    }
    return fetch(url, init).then(function (response) {
      return response.text().then(function (text) {
        var parsed = null;
        try { parsed = text ? JSON.parse(text) : null; } catch (e) { parsed = text; }
        return { ok: response.ok, status: response.status, body: parsed };
      });
    }, function (error) {
      return { ok: false, status: 0, body: { error: { type: "NetworkError", message: String(error) } } };
    });
  }

  function describeError(answer) {
    var error = answer.body && answer.body.error;
    if (!error) return "HTTP " + answer.status;
    var text = error.type + ": " + error.message;
    var details = error.context && error.context.errors;
    if (Array.isArray(details)) {
      text += details.map(function (d) {
        return "\n• " + (d.parameter || d.field || "") + ": " + d.message;
      }).join("");
    }
    return text;
  }

  function show(output, answer, okText) {
    if (!output) return;
    output.classList.toggle("ok", answer.ok);
    output.classList.toggle("err", !answer.ok);
    output.textContent = answer.ok ? okText : describeError(answer);
  }

  function shortJSON(value) {
    var text = JSON.stringify(value);
    if (text === undefined) return "null";
    return text.length > 300 ? text.slice(0, 300) + "… (" + text.length + " chars)" : text;
  }

  // -- generated forms: inputs back to JSON ------------------------------------------------
  function convert(kind, raw) {
    if (kind === "number") { var f = Number(raw); if (raw.trim() === "" || isNaN(f)) throw new Error("not a number: " + raw); return f; }
    if (kind === "integer") { if (!/^-?\d+$/.test(raw.trim())) throw new Error("not an integer: " + raw); return parseInt(raw, 10); }
    if (kind === "boolean") return /^(true|1|yes|on)$/i.test(raw.trim());
    if (kind === "text") return raw;
    try { return JSON.parse(raw); } catch (e) { return raw; }
  }

  function fieldValue(field) {
    var kind = field.dataset.kind;
    var input = field.querySelector("input, select");
    if (kind === "boolean") return { value: input.checked };
    var raw = input.value;
    if (raw === "") return field.hasAttribute("data-required") ? { value: kind === "text" ? "" : undefined } : {};
    if (kind === "choice") return { value: JSON.parse(raw) };
    if (kind === "list") {
      var trimmed = raw.trim();
      if (trimmed.charAt(0) === "[") return { value: JSON.parse(trimmed) };
      var items = trimmed.split(/[,\s]+/).filter(Boolean);
      return { value: items.map(function (item) { return convert(field.dataset.itemKind, item); }) };
    }
    return { value: convert(kind, raw) };
  }

  function formArguments(form) {
    var args = [], kwargs = {};
    form.querySelectorAll(".field[data-param]").forEach(function (field) {
      var got = fieldValue(field);
      if (!("value" in got) || got.value === undefined) return;
      if (field.hasAttribute("data-positional")) {
        if (field.dataset.kind === "list" && Array.isArray(got.value)) args.push.apply(args, got.value);
        else args.push(got.value);
      } else {
        kwargs[field.dataset.param] = got.value;
      }
    });
    return { args: args, kwargs: kwargs };
  }

  // -- device page ---------------------------------------------------------------------------
  var main = document.getElementById("main");
  var deviceId = main && main.dataset.deviceId;
  var lease = null;  // the lease this page holds: {id, timer}

  function devicePath(suffix) { return "/devices/" + encodeURIComponent(deviceId) + suffix; }

  function refreshQuery(output) {
    var method = output.dataset.query;
    // Answers may arrive out of order: only the latest request's answer is shown.
    var ticket = (output.labdTicket || 0) + 1;
    output.labdTicket = ticket;
    return api("POST", devicePath("/call"), { method: method, args: [], kwargs: {} }).then(function (answer) {
      if (output.labdTicket !== ticket) return;
      output.textContent = answer.ok ? shortJSON(answer.body.result) : describeError(answer);
      output.classList.toggle("err", !answer.ok);
    });
  }

  function refreshAll() {
    return Promise.all(Array.prototype.map.call(document.querySelectorAll("output[data-query]"), refreshQuery));
  }

  function submitCall(form) {
    var output = form.querySelector("output.answer");
    var call;
    try { call = formArguments(form); } catch (e) { output.className = "answer err"; output.textContent = e.message; return; }
    output.className = "answer"; output.textContent = "…";
    api("POST", devicePath("/call"), { method: form.dataset.call, args: call.args, kwargs: call.kwargs }).then(function (answer) {
      show(output, answer, answer.ok ? "→ " + shortJSON(answer.body.result) : "");
      if (answer.ok && form.dataset.kind === "command") refreshAll();
    });
  }

  function myName() { return tokens ? body.dataset.user : owner; }

  function applyOwnership(info) {
    var fields = { state: info.state, connected: info.connected ? "yes" : "no",
      streaming: info.streaming ? "yes" : "no",
      unresponsive: info.unresponsive ? "no: a call is past its timeout" : "yes",
      owner: info.owner_label || "nobody",
      last_error: info.last_error ? info.last_error.message : "none" };
    Object.keys(fields).forEach(function (key) {
      var node = document.querySelector('#status [data-field="' + key + '"]');
      if (node) node.textContent = fields[key];
    });
    var stateBadge = document.querySelector('#status [data-field="state"]');
    if (stateBadge) stateBadge.className = "badge state-" + info.state;
    var canOperate = main.dataset.canOperate === "yes";
    var isAdmin = main.dataset.isAdmin === "yes";
    var mineLease = info.owner_kind === "lease" && info.owned_by === myName();
    var othersOwn = info.owned_by !== null && info.owned_by !== undefined && !mineLease;
    var reason = "";
    if (!canOperate) reason = "Commands need the operator role; you are " + body.dataset.role + ".";
    else if (othersOwn) reason = "Controls are disabled: the device is owned by " + (info.owner_label || info.owned_by) +
      (info.owner_kind === "lease" && isAdmin ? ". As an admin you may break the lease." : ".");
    document.getElementById("control-reason").textContent = reason;
    var disabled = !canOperate || othersOwn;
    document.querySelectorAll("[data-command]").forEach(function (node) { node.disabled = disabled; });
    var take = document.querySelector('[data-action="take-control"]');
    var release = document.querySelector('[data-action="release-control"]');
    var breaker = document.querySelector('[data-action="break-lease"]');
    take.hidden = mineLease; take.disabled = !canOperate || othersOwn;
    release.hidden = !mineLease;
    if (breaker) breaker.hidden = !(othersOwn && info.owner_kind === "lease");
    // Only a lease this page took is renewed and released with it: a lease the same user
    // holds from a script is theirs to keep, even while they look at this page.
    if (lease && !(mineLease && info.owner_id === lease.id)) dropLease();
    main.dataset.leaseId = info.owner_kind === "lease" ? info.owner_id : "";
  }

  var deviceTicket = 0;
  function reloadDevice() {
    var ticket = ++deviceTicket;  // only the latest answer counts (answers may cross)
    return api("GET", devicePath("")).then(function (answer) {
      if (answer.ok && ticket === deviceTicket) applyOwnership(answer.body);
    });
  }

  function keepLease(id) {
    dropLease();
    // Renewed well before the 30 s TTL while the page is open; released when it is left.
    lease = { id: id, timer: setInterval(function () {
      api("POST", "/leases/" + encodeURIComponent(id) + "/renew", { ttl: 30 }).then(function (answer) {
        if (!answer.ok) { dropLease(); reloadDevice(); }
      });
    }, 10000) };
  }

  function dropLease() { if (lease) { clearInterval(lease.timer); lease = null; } }

  function releaseOnLeave() {
    if (!lease) return;
    fetch("/leases/" + encodeURIComponent(lease.id), { method: "DELETE", headers: headers(), keepalive: true, credentials: "same-origin" });
    dropLease();
  }

  var deviceActions = {
    "take-control": function (out) {
      return api("POST", "/leases", { device_ids: [deviceId], ttl: 30 }).then(function (answer) {
        show(out, answer, answer.ok ? "You hold the lease " + answer.body.lease_id + " while this page is open." : "");
        if (answer.ok) keepLease(answer.body.lease_id);
        return reloadDevice();
      });
    },
    "release-control": function (out) {
      var id = lease ? lease.id : main.dataset.leaseId;
      dropLease();
      return api("DELETE", "/leases/" + encodeURIComponent(id)).then(function (answer) {
        show(out, answer, "Released."); return reloadDevice();
      });
    },
    "break-lease": function (out) {
      var id = main.dataset.leaseId;
      return api("DELETE", "/leases/" + encodeURIComponent(id) + "?reason=" + encodeURIComponent("broken from the dashboard")).then(function (answer) {
        show(out, answer, "Lease broken."); return reloadDevice();
      });
    },
    "connect": function (out) { return api("POST", devicePath("/connect")).then(function (a) { show(out, a, "Connected."); refreshAll(); return reloadDevice(); }); },
    "disconnect": function (out) { return api("POST", devicePath("/disconnect")).then(function (a) { show(out, a, "Disconnected."); return reloadDevice(); }); },
    "clear-error": function (out) { return api("DELETE", devicePath("/error")).then(function (a) { show(out, a, "Error cleared."); return reloadDevice(); }); },
    "refresh-all": function () { return refreshAll(); },
    "stream-stop": function (out) {
      var plot = document.querySelector("[data-plot]");
      if (plot && window.LabdPlot) window.LabdPlot.stop(plot);
      return api("POST", devicePath("/stream/stop")).then(function (a) {
        show(out, a, "Stream stopped."); refreshAll(); return reloadDevice();
      });
    },
    "stream-start": function () {
      var plot = document.querySelector("[data-plot]");
      if (plot && window.LabdPlot) window.LabdPlot.start(plot);
    },
  };

  // -- run page ------------------------------------------------------------------------------
  var taskId = main && main.dataset.taskId;
  var runActions = {};
  ["pause", "resume", "cancel"].forEach(function (verb) {
    runActions[verb] = function (out) {
      return api("POST", "/tasks/" + encodeURIComponent(taskId) + "/" + verb).then(function (a) {
        show(out, a, a.ok ? a.body.status.replace("_", " ") : "");
      });
    };
  });

  function setProgress(percent, text) {
    var bar = document.querySelector('main [role="progressbar"]');
    if (!bar) return;
    bar.setAttribute("aria-valuenow", String(percent));
    bar.firstElementChild.style.width = percent + "%";
    var label = document.querySelector('[data-field="progress-text"]');
    if (label && text !== undefined) label.textContent = text;
  }

  function addMessage(text) {
    var list = document.querySelector("[data-messages]");
    if (!list) return;
    var item = document.createElement("li");
    item.textContent = new Date().toLocaleTimeString() + " " + text;
    list.appendChild(item);
    while (list.children.length > 200) list.removeChild(list.firstChild);
  }

  // Task stream events that are not data (plot.js forwards them here).
  function onTaskEvent(kind, event) {
    if (kind === "progress" || (kind === "state" && event.progress)) {
      var p = event.progress || event;
      if (typeof p.done === "number" && typeof p.total === "number" && p.total > 0) {
        var percent = Math.max(0, Math.min(100, Math.round(100 * p.done / p.total)));
        setProgress(percent, percent + " % " + (p.message || ""));
      }
      if (kind === "progress") addMessage("progress: " + p.done + "/" + p.total + " " + (p.message || ""));
    }
    if (kind === "state" || kind === "finished") {
      var status = event.status;
      var badge = document.querySelector('[data-field="status"]');
      if (badge && status) { badge.textContent = status; badge.className = "badge state-" + status; }
      addMessage(kind + ": " + status);
    }
    if (kind === "finished") {
      if (event.status === "completed") setProgress(100);
      // The record (result, downloads) is the server's to render; reload once it is stored.
      setTimeout(function () { window.location.reload(); }, 300);
    }
  }

  // -- sign-in, launch, sign-out ---------------------------------------------------------------
  function submitLogin(form) {
    var out = form.querySelector("output");
    api("POST", "/ui/login", { token: form.querySelector("#token").value }).then(function (answer) {
      if (answer.ok) { window.location.assign(form.dataset.next || "/ui/"); return; }
      show(out, answer, "");
    });
  }

  function submitLaunch(form) {
    var out = form.querySelector("output");
    var call;
    try { call = formArguments(form); } catch (e) { out.className = "answer err"; out.textContent = e.message; return; }
    var id = form.querySelector("#task_id").value.trim();
    var payload = { task_type: form.dataset.taskType, params: call.kwargs, task_id: id || null };
    out.className = "answer"; out.textContent = "Starting…";
    api("POST", "/tasks", payload).then(function (answer) {
      if (answer.ok) { window.location.assign("/ui/runs/" + encodeURIComponent(answer.body.task_id)); return; }
      show(out, answer, "");
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset.call) { event.preventDefault(); submitCall(form); }
    else if (form.dataset.form === "login") { event.preventDefault(); submitLogin(form); }
    else if (form.dataset.form === "launch") { event.preventDefault(); submitLaunch(form); }
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) return;
    var action = button.dataset.action;
    var out = button.closest("section, form, header");
    out = out ? out.querySelector("output.answer") : null;
    if (action === "sign-out") {
      api("POST", "/ui/logout").then(function () { window.location.assign("/ui/login"); });
    } else if (action === "refresh") {
      var node = document.querySelector('output[data-query="' + button.dataset.method + '"]');
      if (node) refreshQuery(node);
    } else if (deviceActions[action] && deviceId) {
      deviceActions[action](out);
    } else if (runActions[action] && taskId) {
      runActions[action](out);
    }
  });

  // htmx: every request it makes carries the header too (the live overview parts).
  document.addEventListener("htmx:configRequest", function (event) {
    Object.assign(event.detail.headers, headers());
  });

  // Who owns the device, live: the daemon's events for this device re-read its info.
  var ownershipEvents = ["device_state", "device_error", "devices_claimed", "devices_released",
    "lease_granted", "lease_renewed", "lease_released", "lease_expired", "lease_broken",
    "stream_started", "stream_stopped"];

  function followDeviceEvents() {
    var source = new EventSource("/stream/events");
    ownershipEvents.forEach(function (name) {
      source.addEventListener(name, function (message) {
        var data = {};
        try { data = JSON.parse(message.data); } catch (e) { return; }
        var ids = data.device_ids || (data.lease && data.lease.device_ids) || [data.device_id];
        if (ids.indexOf(deviceId) >= 0) reloadDevice();
      });
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  // The plot's stream: the start button says whether this page follows it.
  document.addEventListener("labd:stream-open", function () {
    var start = document.querySelector('[data-action="stream-start"]');
    if (start) { start.textContent = "Following the stream"; start.disabled = true; }
    if (deviceId) refreshAll();
  });
  document.addEventListener("labd:stream-closed", function () {
    var start = document.querySelector('[data-action="stream-start"]');
    if (start) { start.textContent = "Start stream"; start.disabled = main.dataset.canOperate !== "yes"; }
    if (deviceId) { refreshAll(); reloadDevice(); }
  });

  window.addEventListener("pagehide", releaseOnLeave);

  window.labd = { api: api, onTaskEvent: onTaskEvent, headers: headers };

  document.addEventListener("DOMContentLoaded", function () {
    if (deviceId) { refreshAll(); reloadDevice(); followDeviceEvents(); }
  });
})();
