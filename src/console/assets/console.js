// The Stagecraft console. Plain JavaScript, no build step: every page is rendered here from
// the public API's answers, with the caller's own authorisation. Data is only ever placed in
// the page as text (never as HTML).
"use strict";

(function () {
  const app = document.getElementById("app");
  const state = { session: null, timers: [], streams: [] };
  const Stagecraft = (window.Stagecraft = window.Stagecraft || {});
  const registered = (Stagecraft._panels = Stagecraft._panels || []);
  Stagecraft.panels = {
    register(panel) { registered.push(panel); },
  };

  // ---------- helpers ----------
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "class") node.className = value;
      else if (key === "style") node.style.cssText = value; // the CSSOM, which the CSP allows
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  Stagecraft.h = h;

  function money(value) {
    if (value === null || value === undefined) return "—";
    const n = Number(value);
    return "$" + (n >= 100 ? n.toFixed(2) : n.toFixed(4));
  }
  function seconds(ms) {
    if (ms === null || ms === undefined || isNaN(ms)) return "—";
    const s = ms / 1000;
    if (s < 1) return Math.round(ms) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }
  function ago(time) {
    if (!time) return "—";
    return seconds(Date.now() - Date.parse(time)) + " ago";
  }
  function when(time) {
    if (!time) return "—";
    const d = new Date(time);
    return d.toLocaleString();
  }
  function leaseLeft(time) {
    const left = Date.parse(time) - Date.now();
    return left >= 0 ? "expires in " + seconds(left) : "expired " + seconds(-left) + " ago";
  }
  function shortId(id) { return id ? id.slice(0, 8) + "…" + id.slice(-4) : ""; }
  function badge(status) { return h("span", { class: "badge s-" + status, dataset: { status } }, status); }
  function runLink(id, label) { return h("a", { href: "/ui/runs/" + encodeURIComponent(id), class: "mono" }, label || shortId(id)); }
  Object.assign(Stagecraft, { money, seconds, ago, when, badge, runLink });

  // Replaces a node's children, leaving out the absent ones (null, undefined, false).
  function put(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  }
  Stagecraft.put = put;

  function clearPage() {
    state.timers.forEach(clearInterval);
    state.timers = [];
    state.streams.forEach((s) => s.close());
    state.streams = [];
    put(app);
  }

  function every(ms, fn) {
    const id = setInterval(() => { if (!document.hidden) fn(); }, ms);
    state.timers.push(id);
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || ("HTTP " + status));
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, options = {}) {
    // The header names the console in the run's events (the session cookie already does
    // when the deployment has tokens; it grants nothing).
    const headers = { Accept: "application/json", "X-Stagecraft-Client": "console" };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    if (options.method && options.method !== "GET" && state.session && state.session.csrf) {
      headers["X-CSRF-Token"] = state.session.csrf;
    }
    const response = await fetch(path, {
      method: options.method || "GET",
      headers,
      credentials: "same-origin",
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
    });
    if (response.status === 401) {
      location.href = "/ui/login?next=" + encodeURIComponent(location.pathname);
      throw new ApiError(401, null);
    }
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }
  Stagecraft.api = api;

  function canChange() { return state.session && state.session.role === "full"; }

  function notice(text, kind) {
    const box = document.getElementById("notice") || h("div", { id: "notice", role: "status" });
    box.className = "notice " + (kind || "");
    box.textContent = text;
    if (!box.isConnected) document.body.append(box);
    clearTimeout(box._timer);
    box._timer = setTimeout(() => box.remove(), 6000);
  }

  function failure(error) {
    notice(error.message || String(error), "bad");
  }

  // ---------- the run list ----------
  const FILTERS = ["status", "kind", "name", "queue", "error_code", "q", "created_after", "created_before", "min_cost_usd", "max_cost_usd"];
  const STATUSES = ["queued", "running", "retrying", "completed", "failed", "cancelled"];
  const KINDS = ["workflow", "agent", "work_order"];

  function currentFilters() {
    const params = new URLSearchParams(location.search);
    const filters = {};
    for (const name of FILTERS) {
      const value = params.get(name);
      if (value) filters[name] = value;
    }
    return filters;
  }

  function toApiTime(local) {
    // <input type=datetime-local> gives local time without a zone.
    const d = new Date(local);
    return isNaN(d) ? local : d.toISOString();
  }

  function apiFilters(filters) {
    const out = {};
    for (const [key, value] of Object.entries(filters)) {
      if (key === "created_after" || key === "created_before") out[key] = toApiTime(value);
      else if (key === "min_cost_usd" || key === "max_cost_usd") out[key] = Number(value);
      else out[key] = value;
    }
    return out;
  }

  function navigate(params) {
    const query = new URLSearchParams(params).toString();
    history.pushState(null, "", "/ui" + (query ? "?" + query : ""));
    route();
  }

  function filterForm(filters) {
    const field = (name, label, input) => h("label", { class: "field" }, h("span", {}, label), input);
    const select = (name, options) => h("select", { name },
      h("option", { value: "" }, "any"),
      options.map((o) => h("option", { value: o, selected: filters[name] === o }, o)));
    const text = (name, attrs) => h("input", Object.assign({ name, value: filters[name] || "" }, attrs || {}));
    const form = h("form", { class: "filters", id: "filters" },
      field("status", "Status", select("status", STATUSES)),
      field("kind", "Kind", select("kind", KINDS)),
      field("name", "Workflow or agent", text("name", { placeholder: "e.g. full_production", maxlength: 200 })),
      field("queue", "Queue", text("queue", { maxlength: 200 })),
      field("error_code", "Error code", text("error_code", { maxlength: 200 })),
      field("q", "Input contains", text("q", { placeholder: "3+ characters", minlength: 3, maxlength: 200 })),
      field("created_after", "Created after", text("created_after", { type: "datetime-local" })),
      field("created_before", "Created before", text("created_before", { type: "datetime-local" })),
      field("min_cost_usd", "Min $", text("min_cost_usd", { type: "number", min: 0, step: "any" })),
      field("max_cost_usd", "Max $", text("max_cost_usd", { type: "number", min: 0, step: "any" })),
      h("div", { class: "buttons" },
        h("button", { type: "submit" }, "Apply"),
        h("button", { type: "button", id: "failed-only", onclick: () => navigate(Object.assign({}, filters, { status: "failed" })) }, "Failed only"),
        h("button", { type: "button", class: "plain", onclick: () => navigate({}) }, "Clear")));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const params = {};
      for (const [key, value] of new FormData(form).entries()) if (value) params[key] = value;
      navigate(params);
    });
    return form;
  }

  function progressOf(run) {
    if (run.current_stage && !["completed", "failed", "cancelled"].includes(run.status)) return run.current_stage;
    return run.last_completed_stage ? "✓ " + run.last_completed_stage : "—";
  }

  function runRow(run) {
    const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
    return h("tr", { dataset: { run: run.run_id } },
      h("td", {}, runLink(run.run_id)),
      h("td", {}, run.name),
      h("td", {}, run.kind),
      h("td", {}, badge(run.status)),
      h("td", {}, progressOf(run)),
      h("td", { class: "num" }, money(run.cost_usd), run.budget_usd !== null && run.budget_usd !== undefined ? h("span", { class: "muted" }, " / " + money(run.budget_usd)) : null),
      h("td", { title: when(run.created_at) }, ago(run.created_at)),
      h("td", { class: "num" }, seconds(end - Date.parse(run.created_at))));
  }

  function bulkPanel(filters) {
    if (!canChange()) return null;
    const out = h("div", { class: "bulk-result", id: "bulk-result" });
    const ask = (action) => async () => {
      put(out, "Counting…");
      try {
        const body = { action, filter: apiFilters(filters), dry_run: true };
        const dry = await api("/runs/bulk", { method: "POST", body });
        const verb = action === "cancel" ? "cancel" : "retry";
        const confirm = h("button", { class: "danger", id: "bulk-confirm", onclick: async () => {
          put(out, "Working…");
          try {
            const done = await api("/runs/bulk", { method: "POST", body: Object.assign({}, body, { dry_run: false }) });
            put(out, `${done.changed} runs ${verb === "cancel" ? "cancelled" : "resumed"}` +
              (done.failed.length ? `, ${done.failed.length} failed` : "") + (done.more ? " (more remain: run again)" : ""));
            refreshList();
          } catch (e) { failure(e); }
        } }, `Yes, ${verb} ${dry.changed}`);
        put(out,
          h("span", { id: "bulk-count" }, `${dry.changed} of ${dry.matched} matching runs would be ${verb === "cancel" ? "cancelled" : "retried"}` +
            (dry.skipped ? ` (${dry.skipped} skipped: not ${verb === "cancel" ? "unfinished" : "failed or cancelled"})` : "") +
            (dry.more ? " — more than one request's worth" : "") + ". "),
          dry.changed > 0 ? confirm : null,
          h("button", { class: "plain", onclick: () => put(out) }, "Never mind"));
      } catch (e) { failure(e); put(out); }
    };
    return h("div", { class: "bulk" },
      h("span", { class: "muted" }, "For every run matching these filters: "),
      h("button", { id: "bulk-cancel", onclick: ask("cancel") }, "Cancel…"),
      h("button", { id: "bulk-retry", onclick: ask("retry") }, "Retry…"),
      out);
  }

  let refreshList = () => {};

  async function listPage() {
    const filters = currentFilters();
    const params = new URLSearchParams(location.search);
    const cursor = params.get("cursor");
    const table = h("table", { class: "runs", id: "runs" },
      h("thead", {}, h("tr", {}, ["Run", "Name", "Kind", "Status", "Stage", "Cost / budget", "Created", "Duration"].map((t) => h("th", {}, t)))),
      h("tbody"));
    const summary = h("p", { class: "muted", id: "summary" });
    const pager = h("div", { class: "pager" });
    put(app, h("h1", {}, "Runs"), filterForm(filters), bulkPanel(filters), summary, table, pager);
    refreshList = async () => {
      const query = new URLSearchParams(apiFilters(filters));
      query.set("limit", "50");
      if (cursor) query.set("cursor", cursor);
      try {
        const list = await api("/runs?" + query.toString());
        put(table.tBodies[0], ...list.runs.map(runRow));
        if (!list.runs.length) table.tBodies[0].append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No runs match.")));
        put(summary,
          `${list.total} run${list.total === 1 ? " matches" : "s match"}`,
          list.scan ? ` among the ${list.scan.examined} examined${list.scan.complete ? "" : " so far (this store checks runs one by one; the next page searches on)"}` : "",
          ".");
        put(pager, ...[
          cursor ? h("a", { href: "/ui?" + new URLSearchParams(filters).toString(), onclick: (e) => { e.preventDefault(); navigate(filters); } }, "⟵ Newest") : null,
          list.next_cursor ? h("a", { id: "next-page", href: "#", onclick: (e) => { e.preventDefault(); navigate(Object.assign({}, filters, { cursor: list.next_cursor })); } }, "Older ⟶") : null].filter(Boolean));
      } catch (e) {
        if (e.status !== 401) put(summary, h("span", { class: "bad" }, e.message));
      }
    };
    await refreshList();
    every(3000, refreshList);
  }

  // ---------- one run ----------
  // A stored artifact path as its URL; null for one that could point elsewhere.
  function artifactUrl(path) {
    const parts = String(path).split("/");
    if (parts.some((p) => p === "" || p === "." || p === "..")) return null;
    return "/artifacts/" + parts.map(encodeURIComponent).join("/");
  }

  function player(path) {
    const url = artifactUrl(path);
    if (!url) return null;
    const ext = (path.split(".").pop() || "").toLowerCase();
    if (["mp4", "webm", "mov", "m4v"].includes(ext)) {
      return h("video", { controls: true, preload: "metadata", src: url, class: "media", dataset: { artifact: path } });
    }
    if (["mp3", "wav", "m4a", "ogg", "aac", "flac"].includes(ext)) {
      return h("audio", { controls: true, preload: "metadata", src: url, dataset: { artifact: path } });
    }
    if (["png", "jpg", "jpeg", "gif", "webp"].includes(ext)) {
      return h("img", { src: url, alt: path, class: "media" });
    }
    if (["json", "txt", "md", "srt", "vtt", "log", "jsonl", "csv"].includes(ext)) {
      const pre = h("pre", { class: "text", dataset: { artifact: path } }, "…");
      fetch(url, { credentials: "same-origin", headers: { Range: "bytes=0-262143" } })
        .then((r) => r.text())
        .then((text) => {
          if (ext === "json") {
            try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* partial or not JSON */ }
          }
          pre.textContent = text;
        })
        .catch((e) => { pre.textContent = "could not read: " + e.message; });
      return pre;
    }
    return null;
  }

  function costBar(run) {
    const stages = run.stages || [];
    const budget = run.budget_usd;
    const scale = Math.max(budget || 0, run.cost_usd || 0) || 1;
    const bar = h("div", { class: "costbar", title: `${money(run.cost_usd)} of ${budget === null || budget === undefined ? "no budget" : money(budget)}` });
    stages.forEach((stage, i) => {
      if (!stage.cost_usd) return;
      bar.append(h("span", { class: "seg c" + (i % 6), style: `width:${(100 * stage.cost_usd) / scale}%`, title: `${stage.name}: ${money(stage.cost_usd)}` }));
    });
    if (budget) bar.append(h("span", { class: "budget-mark", style: `left:${(100 * budget) / scale}%` }));
    return h("div", { class: "cost" },
      h("div", { class: "cost-label" }, h("strong", { id: "cost" }, money(run.cost_usd)),
        budget !== null && budget !== undefined ? ` of ${money(budget)} budget (${Math.round((100 * run.cost_usd) / budget)}%)` : " (no budget)",
        run.cost_simulated ? h("span", { class: "muted" }, " · simulated (mock providers)") : null),
      bar);
  }

  // What the event log says about each stage: its attempts (with their errors) and steps.
  function readEvents(events, order) {
    const stages = {};
    const of = (name) => (stages[name] = stages[name] || { attempts: [], steps: [] });
    for (const event of events) {
      if (!event.stage) continue;
      const stage = of(event.stage);
      const current = stage.attempts[stage.attempts.length - 1];
      switch (event.kind) {
        case "stage_started":
          stage.attempts.push({ attempt: event.data.attempt, started: event.at, errors: [] });
          break;
        case "retry_scheduled":
        case "stage_failed":
          if (current) { current.ended = event.at; current.error = event.data.error || event.data; }
          break;
        case "stage_completed":
          if (current) current.ended = event.at;
          break;
        case "step_completed":
          stage.steps.push({ key: event.data.step, cost: Number(event.data.cost_usd || 0), attempt: current ? current.attempt : 1, at: event.at });
          break;
        case "run_resumed": {
          // The stage resumed from and every later one start again.
          const from = order.indexOf(event.stage);
          for (const name of order.slice(Math.max(from, 0))) {
            if (stages[name]) stages[name] = { attempts: [], steps: [] };
          }
          break;
        }
      }
    }
    return stages;
  }

  function waterfall(run, events, workers) {
    const stages = run.stages || [];
    const seen = readEvents(events, stages.map((s) => s.name));
    const start = Date.parse(run.created_at);
    const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
    const span = Math.max(end - start, 1);
    const holder = workers.find((w) => (w.running || []).includes(run.run_id));
    const rows = stages.map((stage, index) => {
      const info = seen[stage.name] || { attempts: [], steps: [] };
      const bars = h("div", { class: "lane" });
      for (const attempt of info.attempts) {
        const from = Date.parse(attempt.started);
        const to = attempt.ended ? Date.parse(attempt.ended) : (stage.status === "running" ? Date.now() : from);
        bars.append(h("span", {
          class: "bar " + (attempt.error ? "failed" : (attempt.ended ? "done" : "live")),
          style: `left:${(100 * (from - start)) / span}%;width:${Math.max((100 * (to - from)) / span, 0.5)}%`,
          title: `attempt ${attempt.attempt}: ${seconds(to - from)}${attempt.error ? " — " + (attempt.error.message || attempt.error.code || "") : ""}`,
        }));
      }
      const elapsed = stage.started_at ? (stage.finished_at ? Date.parse(stage.finished_at) : Date.now()) - Date.parse(stage.started_at) : null;
      const attempts = stage.attempts ? `${stage.attempts}${stage.max_attempts ? " of " + stage.max_attempts : ""}` : "—";
      const retries = info.attempts.filter((a) => a.error).map((a) =>
        h("li", {}, `attempt ${a.attempt}: `, h("code", {}, (a.error && a.error.code) || "error"), " ", (a.error && a.error.message) || ""));
      const steps = info.steps.length ? h("details", { class: "steps" },
        h("summary", {}, `${info.steps.length} step${info.steps.length === 1 ? "" : "s"}`),
        h("ul", {}, info.steps.map((step) => {
          const kept = stage.attempts > step.attempt && info.attempts.some((a) => a.attempt > step.attempt);
          return h("li", { class: kept ? "kept" : "" }, h("code", {}, step.key), " ", money(step.cost),
            kept ? h("span", { class: "saved" }, ` kept from attempt ${step.attempt}: saved ${money(step.cost)}`) : null);
        }))) : null;
      const live = stage.status === "running" && holder;
      return h("tr", { dataset: { stage: stage.name, status: stage.status } },
        h("td", {}, h("strong", {}, stage.name),
          stage.reused_from ? h("div", { class: "saved" }, "reused from ", runLink(stage.reused_from), " at no cost") : null),
        h("td", {}, badge(stage.status)),
        h("td", { class: "num" }, attempts),
        h("td", { class: "num" }, seconds(elapsed)),
        h("td", { class: "num" }, money(stage.cost_usd)),
        h("td", {}, stage.progress ? `${stage.progress.done} of ${stage.progress.total}` : "—"),
        h("td", { class: "wide" }, bars,
          live ? h("div", { class: "muted" }, `worker ${holder.id} · heartbeat ${ago(holder.last_heartbeat)}` +
            (run.lease_expires_at ? ` · lease ${leaseLeft(run.lease_expires_at)}` : "")) : null,
          stage.next_attempt_at ? h("div", { class: "muted" }, `next attempt ${when(stage.next_attempt_at)}`) : null,
          stage.error ? h("div", { class: "bad" }, h("code", {}, stage.error.code), " ", stage.error.message) : null,
          retries.length ? h("ul", { class: "retries" }, retries) : null,
          steps));
    });
    return h("table", { class: "stages", id: "stages" },
      h("thead", {}, h("tr", {}, ["Stage", "Status", "Attempt", "Elapsed", "Cost", "Steps", "Timeline"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows));
  }

  function artifactsSection(run) {
    const items = [];
    for (const stage of run.stages || []) {
      for (const path of stage.artifacts || []) {
        if (!artifactUrl(path)) continue;
        items.push(h("figure", { class: "artifact" },
          player(path),
          h("figcaption", {}, h("a", { href: artifactUrl(path) }, path.split("/").pop()),
            h("span", { class: "muted" }, ` · made by ${stage.name}, attempt ${stage.attempts || 1}`))));
      }
    }
    if (!items.length) return null;
    return h("section", { id: "artifacts" }, h("h2", {}, "Artifacts"), h("div", { class: "artifacts" }, items));
  }

  function eventRow(event) {
    const data = Object.assign({}, event.data);
    let actor = null;
    if (data.actor) { actor = `${data.actor.role} via ${data.actor.via}`; delete data.actor; }
    const text = Object.keys(data).length ? JSON.stringify(data) : "";
    return h("tr", {},
      h("td", { class: "num" }, event.seq),
      h("td", {}, new Date(event.at).toLocaleTimeString()),
      h("td", {}, h("code", {}, event.kind)),
      h("td", {}, event.stage || ""),
      h("td", {}, actor ? h("span", { class: "actor" }, actor + " ") : null, h("span", { class: "muted small" }, text.length > 300 ? text.slice(0, 300) + "…" : text)));
  }

  function resumePanel(run, reload) {
    const stages = (run.stages || []).map((s) => s.name);
    const from = h("select", { id: "resume-from" }, h("option", { value: "auto" }, "where it stopped (auto)"), stages.map((s) => h("option", { value: s }, s)));
    const budget = h("input", { id: "resume-budget", type: "number", min: 0, step: "any", placeholder: run.budget_usd === null || run.budget_usd === undefined ? "no budget" : String(run.budget_usd) });
    const out = h("div", { id: "resume-preview" });
    const preview = async () => {
      put(out, "Working out what would be redone…");
      try {
        const p = await api(`/runs/${encodeURIComponent(run.run_id)}/resume-preview?from_stage=${encodeURIComponent(from.value)}`);
        const redo = p.stages.filter((s) => s.redo);
        const go = h("button", { id: "resume-confirm", class: "primary", onclick: async () => {
          const body = { from_stage: from.value };
          if (budget.value !== "") body.budget_usd = Number(budget.value);
          try {
            await api(`/runs/${encodeURIComponent(run.run_id)}/resume`, { method: "POST", body });
            notice("Resumed from " + p.from_stage);
            reload(true);
          } catch (e) { failure(e); }
        } }, `Resume from ${p.from_stage}`);
        put(out,
          h("p", {}, `Will redo ${redo.length} stage${redo.length === 1 ? "" : "s"}: `, h("strong", { id: "redo-stages" }, redo.map((s) => s.name).join(", ")),
            ". Kept: ", p.stages.filter((s) => !s.redo).map((s) => s.name).join(", ") || "nothing", "."),
          h("ul", {}, redo.map((s) => h("li", {}, `${s.name}: last cost ${money(s.last_cost_usd)}`,
            s.steps_kept ? ` (${s.steps_kept} memoised step${s.steps_kept === 1 ? "" : "s"} kept, ${money(s.steps_kept_cost_usd)} not paid again)` : ""))),
          h("p", {}, "Estimated cost: ", h("strong", { id: "resume-estimate" }, money(p.estimated_cost_usd)),
            p.stages_never_run.length ? ` plus ${p.stages_never_run.join(", ")} (never ran; no estimate)` : "",
            `. Spent so far ${money(p.spent_usd)}` + (p.budget_usd !== null && p.budget_usd !== undefined ? ` of ${money(p.budget_usd)}.` : ".")),
          p.over_budget ? h("p", { class: "bad" }, "That exceeds the budget: raise it above before resuming.") : null,
          go);
      } catch (e) { put(out, h("span", { class: "bad" }, e.message)); }
    };
    return h("div", { class: "resume" },
      h("label", {}, "Resume from ", from), " ",
      h("label", {}, "new budget $", budget), " ",
      h("button", { id: "resume-preview-button", onclick: preview }, "Preview"),
      out);
  }

  function actions(run, reload) {
    if (!canChange()) return h("p", { class: "muted", id: "read-only" }, "Read-only access: actions are hidden.");
    const finished = ["completed", "failed", "cancelled"].includes(run.status);
    const cancel = h("button", { id: "cancel", class: "danger", onclick: async () => {
      try {
        await api(`/runs/${encodeURIComponent(run.run_id)}/cancel`, { method: "POST" });
        notice("Cancel requested");
        reload(true);
      } catch (e) { failure(e); }
    } }, run.cancel_requested ? "Cancel requested…" : "Cancel run");
    const retry = h("button", { id: "retry", onclick: async () => {
      try {
        await api(`/runs/${encodeURIComponent(run.run_id)}/resume`, { method: "POST", body: {} });
        notice("Retrying");
        reload(true);
      } catch (e) { failure(e); }
    } }, "Retry");
    return h("section", { class: "actions" },
      !finished ? cancel : null,
      finished && run.status !== "completed" ? retry : null,
      finished ? resumePanel(run, reload) : null);
  }

  async function runPage(id) {
    let events = [];
    let lastSeq = 0;
    let run = null;
    let workers = [];
    const header = h("div", { class: "run-head" });
    const body = h("div");
    const panels = h("div", { id: "panels" });
    const log = h("table", { class: "events", id: "events" },
      h("thead", {}, h("tr", {}, ["#", "Time", "Event", "Stage", "Details"].map((t) => h("th", {}, t)))), h("tbody"));
    put(app, header, body, panels, h("section", {}, h("h2", {}, "Events ", h("span", { class: "muted small", id: "live" }, "")), log));
    let actionsNode = null;
    let artifactsShown = "";

    async function reload(withActions) {
      try {
        [run, workers] = await Promise.all([
          api("/runs/" + encodeURIComponent(id)),
          api("/workers").then((w) => w.workers).catch(() => []),
        ]);
      } catch (e) {
        if (e.status === 404) { put(app, h("h1", {}, "No such run"), h("p", {}, id)); stop(); return; }
        failure(e);
        return;
      }
      document.title = `${run.name} · ${run.status} · Stagecraft`;
      put(header,
        h("h1", {}, run.name, " ", badge(run.status)),
        h("p", { class: "muted" }, h("span", { class: "mono" }, run.run_id), ` · ${run.kind} · ${run.provider_mode} providers · created ${when(run.created_at)}`,
          run.finished_at ? ` · finished ${when(run.finished_at)}` : "", run.worker ? ` · worker ${run.worker}` : ""),
        run.error ? h("p", { class: "bad", id: "run-error" }, h("code", {}, run.error.code), " ", run.error.message) : null,
        costBar(run));
      if (withActions || !actionsNode || actionsNode.dataset.status !== run.status) {
        actionsNode = actions(run, reload);
        actionsNode.dataset.status = run.status;
      }
      const artifactKey = (run.stages || []).map((s) => (s.artifacts || []).join(",")).join(";");
      let artifacts = body.querySelector("#artifacts");
      if (artifactKey !== artifactsShown) {
        artifacts = artifactsSection(run);
        artifactsShown = artifactKey;
      }
      put(body, actionsNode, h("h2", {}, "Stages"), waterfall(run, events, workers), artifacts || "");
      for (const panel of registered) {
        if (panel.matches(run) && !panels.dataset.rendered) {
          panels.dataset.rendered = "1";
          panels.append(panel.render(run, { api, h, put, money, seconds, ago, when, badge, runLink, every, stream: (s) => state.streams.push(s) }));
        } else if (panel.matches(run) && panel.update) {
          panel.update(run);
        }
      }
    }

    let pending = null;
    function soon() {
      if (pending) return;
      pending = setTimeout(() => { pending = null; reload(false); }, 250);
    }

    let source = null;
    function open() {
      if (source) return;
      source = new EventSource("/runs/" + encodeURIComponent(id) + "/events");
      state.streams.push(source);
      document.getElementById("live").textContent = "● live";
      const take = (message) => {
        let event;
        try { event = JSON.parse(message.data); } catch (_) { return; }
        if (event.seq <= lastSeq) return;
        lastSeq = event.seq;
        events.push(event);
        log.tBodies[0].prepend(eventRow(event));
        soon();
      };
      source.onmessage = take;
      for (const kind of ["run_queued", "run_started", "stage_started", "step_completed", "stage_completed", "retry_scheduled",
        "stage_failed", "run_failed", "run_cancelled", "cancel_requested", "run_completed", "run_released", "lease_recovered", "run_resumed"]) {
        source.addEventListener(kind, take);
      }
      source.onerror = () => {
        // The server ends the stream once the run finished; reopen only while it runs.
        source.close();
        source = null;
        const live = document.getElementById("live");
        if (live) live.textContent = "";
        if (run && !["completed", "failed", "cancelled"].includes(run.status)) setTimeout(() => { if (!document.hidden) open(); }, 2000);
      };
    }
    function stop() {
      if (source) { source.close(); source = null; }
      const live = document.getElementById("live");
      if (live) live.textContent = "paused";
    }
    const visibility = () => { if (document.hidden) stop(); else { open(); reload(false); } };
    document.addEventListener("visibilitychange", visibility);
    state.streams.push({ close: () => document.removeEventListener("visibilitychange", visibility) });

    await reload(true);
    if (!document.hidden) open();
    // Heartbeat ages and elapsed times move without events.
    every(5000, () => { if (run && !["completed", "failed", "cancelled"].includes(run.status)) reload(false); });
  }

  // ---------- queues and workers ----------
  function spark(points, max) {
    const width = 240, height = 36;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "spark");
    const step = width / Math.max(points.length, 1);
    points.forEach((p, i) => {
      const total = p.completed + p.failed + p.cancelled;
      if (!total) return;
      const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const hgt = Math.max((height * total) / (max || 1), 1);
      bar.setAttribute("x", String(i * step));
      bar.setAttribute("y", String(height - hgt));
      bar.setAttribute("width", String(Math.max(step - 1, 1)));
      bar.setAttribute("height", String(hgt));
      bar.setAttribute("class", p.failed ? "f" : "ok");
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${p.completed} completed, ${p.failed} failed, ${p.cancelled} cancelled`;
      bar.append(title);
      svg.append(bar);
    });
    return svg;
  }

  function buckets(minutes, queue, since, count, size) {
    const out = Array.from({ length: count }, () => ({ completed: 0, failed: 0, cancelled: 0 }));
    for (const m of minutes) {
      if (m.queue !== queue) continue;
      const i = Math.floor((Date.parse(m.minute) - since) / size);
      if (i < 0 || i >= count) continue;
      out[i].completed += m.completed; out[i].failed += m.failed; out[i].cancelled += m.cancelled;
    }
    return out;
  }

  async function queuesPage() {
    const queuesBox = h("div", { id: "queues" });
    const workersBox = h("div", { id: "workers" });
    const failuresBox = h("div", { id: "failures" });
    put(app, h("h1", {}, "Queues & workers"), queuesBox, h("h2", {}, "Live workers"), workersBox,
      h("h2", {}, "Failures in the last day, by error code"), failuresBox);
    async function refresh() {
      try {
        const [queues, day, workers, failures] = await Promise.all([
          api("/queues"), api("/queues/history?window=day"), api("/workers"), api("/failures"),
        ]);
        const names = [...new Set([...queues.queues.map((q) => q.queue), ...day.minutes.map((m) => m.queue)])].sort();
        const now = Date.now();
        const daySince = now - 24 * 3600e3, hourSince = now - 3600e3;
        const count = (queue, status) => (queues.queues.find((q) => q.queue === queue && q.status === status) || { count: 0 }).count;
        const sum = (queue, since) => day.minutes.filter((m) => m.queue === queue && Date.parse(m.minute) >= since)
          .reduce((a, m) => a + m.completed + m.failed + m.cancelled, 0);
        put(queuesBox, h("table", { class: "queues" },
          h("thead", {}, h("tr", {}, ["Queue", "Queued", "Running", "Retrying", "Oldest waiting", "Done last hour", "Done last day", "Per 10 min, last day"].map((t) => h("th", {}, t)))),
          h("tbody", {}, names.map((queue) => {
            const waiting = queues.waiting.find((w) => w.queue === queue);
            const points = buckets(day.minutes, queue, daySince, 144, 600e3);
            const max = Math.max(1, ...points.map((p) => p.completed + p.failed + p.cancelled));
            return h("tr", { dataset: { queue } },
              h("td", {}, h("a", { href: "/ui?queue=" + encodeURIComponent(queue) }, queue)),
              h("td", { class: "num" }, count(queue, "queued")),
              h("td", { class: "num" }, count(queue, "running")),
              h("td", { class: "num" }, count(queue, "retrying")),
              h("td", {}, waiting ? ago(waiting.oldest_due_at) : "—"),
              h("td", { class: "num" }, sum(queue, hourSince)),
              h("td", { class: "num" }, sum(queue, daySince)),
              h("td", {}, spark(points, max)));
          }))));
        put(workersBox, workers.workers.length ? h("table", { class: "workers" },
          h("thead", {}, h("tr", {}, ["Worker", "Queues", "Slots", "Running", "Heartbeat", "Started"].map((t) => h("th", {}, t)))),
          h("tbody", {}, workers.workers.map((w) => h("tr", {},
            h("td", { class: "mono" }, w.id), h("td", {}, w.queues.join(", ")), h("td", { class: "num" }, w.concurrency),
            h("td", {}, w.running.length ? w.running.map((id) => [runLink(id), " "]) : "idle"),
            h("td", {}, ago(w.last_heartbeat)), h("td", {}, when(w.started_at)))))) : h("p", { class: "muted" }, "No live workers."));
        put(failuresBox, failures.groups.length ? h("table", { class: "failures" },
          h("thead", {}, h("tr", {}, ["Error code", "Runs", "Workflows and agents", "Latest"].map((t) => h("th", {}, t)))),
          h("tbody", {}, failures.groups.map((g) => h("tr", {},
            h("td", {}, h("a", { href: "/ui?status=failed&error_code=" + encodeURIComponent(g.code) }, h("code", {}, g.code))),
            h("td", { class: "num" }, g.count), h("td", {}, g.names.join(", ")),
            h("td", {}, runLink(g.latest_run_id), " ", h("span", { class: "muted small" }, g.latest_message)))))) :
          h("p", { class: "muted" }, "No failed runs."),
          failures.complete ? null : h("p", { class: "muted" }, `The ${failures.examined} most recent failed runs.`));
      } catch (e) { if (e.status !== 401) failure(e); }
    }
    await refresh();
    every(5000, refresh);
  }

  // ---------- routing ----------
  async function route() {
    clearPage();
    const path = location.pathname;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("here",
      (a.dataset.nav === "queues" && path === "/ui/queues") || (a.dataset.nav === "runs" && path !== "/ui/queues")));
    const match = path.match(/^\/ui\/runs\/([^/]+)$/);
    if (match) {
      let id = match[1];
      try { id = decodeURIComponent(id); } catch (_) { /* shown as written: no such run */ }
      return runPage(id);
    }
    if (path === "/ui/queues") return queuesPage();
    return listPage();
  }

  async function start() {
    try {
      state.session = await api("/ui/session");
    } catch (e) {
      if (e.status !== 401) failure(e);
      return;
    }
    const who = document.getElementById("who");
    put(who, state.session.role === "read_only" ? h("span", { class: "badge ro" }, "read-only") : "",
      state.session.token_required ? h("form", { method: "post", action: "/ui/logout", class: "inline" }, h("button", { class: "plain" }, "Sign out")) : "");
    window.addEventListener("popstate", route);
    await route();
  }

  start();
})();
