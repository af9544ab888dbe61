// meshxl live view: polls ../v1/view (what `meshxl status` and `meshxl sync` report) and
// draws it. Everything that comes from the mesh (member and node names, reasons, NACK
// texts) is set as text (textContent, createTextNode) or as a data attribute: never as
// markup, so nothing read from etcd or Envoy is ever parsed as HTML.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(window.location.search);
  const requested = Number(params.get("interval"));
  // Poll period: ?interval=SECONDS (0.1 to 60), 0.5 s by default.
  const INTERVAL_MS = 1000 * Math.min(60, Math.max(0.1, requested > 0 ? requested : 0.5));
  const DATA_URL = new URL("../v1/view", window.location.href);
  const SAFE_CLASS = /^[a-z][a-z0-9-]{0,40}$/;
  const LABEL_CHARS = 26;
  const rendered = new Map(); // section -> JSON of what it shows now
  let updates = 0;

  // -- DOM helpers ----------------------------------------------------------------------

  function el(tag, options, ...children) {
    const node = document.createElement(tag);
    decorate(node, options);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") addClass(node, value);
      else node.setAttribute(name, String(value));
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function decorate(node, options) {
    if (!options) return;
    if (options.cls) addClass(node, options.cls);
    if (options.data) {
      for (const [key, value] of Object.entries(options.data)) {
        if (value !== null && value !== undefined) node.dataset[key] = String(value);
      }
    }
    if (options.title) node.title = String(options.title);
  }

  function addClass(node, names) {
    for (const name of String(names).split(" ")) {
      if (SAFE_CLASS.test(name)) node.classList.add(name);
    }
  }

  function cell(value, options) {
    return el("td", options, value === null || value === undefined || value === "" ? "-" : value);
  }

  function numCell(value, options) {
    return cell(value, { ...(options || {}), cls: `num ${(options && options.cls) || ""}` });
  }

  function replace(id, ...children) {
    document.getElementById(id).replaceChildren(...children);
  }

  /** Re-render a section only when what it shows changed (keeps text selectable). */
  function section(name, input, draw) {
    const key = JSON.stringify(input);
    if (rendered.get(name) === key) return;
    rendered.set(name, key);
    draw(input);
  }

  // -- formatting -----------------------------------------------------------------------

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function toDate(value) {
    if (isNumber(value)) return new Date(value * 1000);
    if (typeof value === "string" && value) {
      const date = new Date(value);
      return Number.isNaN(date.getTime()) ? null : date;
    }
    return null;
  }

  function pad(n, width) {
    return String(n).padStart(width, "0");
  }

  function clock(value, millis) {
    const date = toDate(value);
    if (date === null) return value ? String(value) : "-";
    const text = `${pad(date.getHours(), 2)}:${pad(date.getMinutes(), 2)}:${pad(date.getSeconds(), 2)}`;
    return millis ? `${text}.${pad(date.getMilliseconds(), 3)}` : text;
  }

  function iso(value) {
    const date = toDate(value);
    return date === null ? "" : date.toISOString();
  }

  function ms(value) {
    if (!isNumber(value)) return "-";
    const abs = Math.abs(value);
    return abs >= 100 ? value.toFixed(0) : abs >= 10 ? value.toFixed(1) : value.toFixed(2);
  }

  function short(text, chars) {
    const value = String(text);
    return value.length > chars ? `${value.slice(0, chars - 1)}\u2026` : value;
  }

  // -- sections -------------------------------------------------------------------------

  function drawHeader(data) {
    const replica = data.replica || {};
    const name = document.getElementById("replica");
    name.replaceChildren(`replica ${replica.name || "?"}`,
      replica.ready ? "" : ` (not ready: ${(replica.reasons || []).join("; ")})`);
    name.className = replica.ready ? "muted" : "error-text";
    const status = data.status || {};
    document.getElementById("updated").textContent =
      `etcd revision ${status.revision ?? "?"}, read at ${clock(data.read_at, true)}`;
  }

  function drawWarnings(list) {
    replace("warnings", ...list.map((w) => el("li", null, w)));
  }

  function drawClusters(input) {
    const { clusters, modelError, modelFound } = input;
    const parts = [];
    if (modelError) parts.push(el("p", { cls: "error" }, `model error: ${modelError}`));
    if (!modelFound) parts.push(el("p", { cls: "error" }, "no model stored in etcd: run 'meshxl apply FILE'"));
    for (const c of clusters) {
      const sticky = c.stickiness
        ? `${c.stickiness.algorithm} on ${c.stickiness.key} ${c.stickiness.on}` : "none";
      parts.push(el("h3", null, `cluster ${c.name}`,
        el("span", { cls: "muted" }, ` \u00b7 ${c.mode} \u00b7 membership ${c.membership} \u00b7 sticky ${sticky}`)));
      const head = el("tr", null, ...["member", "site", "role", "EDS priority", "weight", "load share",
        "state", "reason", "since", "failovers", "address"].map((h) => el("th", null, h)));
      const rows = c.members.map((m) => memberRow(c.name, m))
        .concat((c.departed || []).map((m) => departedRow(c.name, m)));
      parts.push(el("table", { cls: "members", data: { cluster: c.name } },
        el("thead", null, head), el("tbody", null, ...rows)));
    }
    replace("clusters", ...parts);
  }

  function memberRow(cluster, m) {
    const last = m.last_change || {};
    let state = m.state;
    if (m.problems && m.problems.length) state += ` (${m.problems.join(", ")})`;
    const judged = m.degraded;
    if (judged && judged.kind === "probe") state += " (probed beside the active)";
    else if (judged && judged.kind === "handback") state += " (handing the probe's sessions back)";
    else if (judged && isNumber(judged.share)) {
      state += ` (${(judged.share * 100).toFixed(0)}% of its weight)`;
    }
    if (m.warmup && isNumber(m.warmup.fraction)) {
      state += ` (warming up: ${(m.warmup.fraction * 100).toFixed(0)}% of its weight)`;
    }
    const share = isNumber(m.share) ? m.share : 0;
    const meter = el("meter", { title: `${(share * 100).toFixed(1)}% of new sessions` });
    meter.min = 0;
    meter.max = 1;
    meter.value = share;
    return el("tr", { cls: "member", data: { cluster, member: m.name, state: m.state } },
      cell(m.name, { cls: "mono" }), cell(m.site), cell(m.role),
      numCell(m.priority, { title: m.priority === null ? "not advertised to Envoy" : "" }),
      numCell(m.weight),
      el("td", { cls: "num" }, meter, ` ${(share * 100).toFixed(0)}%`),
      cell(state, { cls: `state state-${m.state}` }),
      cell(last.reason, { cls: "reason" }),
      cell(clock(last.at), { title: iso(last.at) }),
      numCell(m.failovers), cell(m.address, { cls: "mono" }));
  }

  /** A member whose registration ended in the last minutes: no longer in the cluster. */
  function departedRow(cluster, m) {
    const last = m.last_change || {};
    return el("tr", { cls: "member departed", data: { cluster, member: m.name, state: m.state },
      title: "registration ended: no longer a member of the cluster" },
      cell(m.name, { cls: "mono" }), cell(null), cell(null), numCell(null), numCell(null),
      numCell("0%"), cell(`${m.state} (left)`, { cls: `state state-${m.state}` }),
      cell(last.reason, { cls: "reason" }), cell(clock(last.at), { title: iso(last.at) }),
      numCell(m.failovers), cell(null));
  }

  /** Pools: each member's roles and share; each virtual system's active and standby. */
  function drawVirtual(input) {
    const { pools, systems } = input;
    document.getElementById("virtual-section").hidden = !pools.length;
    const parts = [];
    for (const p of pools) {
      parts.push(el("h3", null, `pool ${p.name}`,
        el("span", { cls: "muted" }, ` \u00b7 listener ${p.listener || "-"}`)));
      const head = el("tr", null, ...["member", "site", "capacity", "active", "standby",
        "active weight", "fair share", "x fair", "state"].map((h) => el("th", null, h)));
      const rows = p.members.map((m) => el("tr", { cls: "pool-member",
        data: { pool: p.name, member: m.name } },
      cell(m.name), cell(m.site), numCell(m.capacity), numCell(m.active), numCell(m.standby),
      numCell(m.active_weight), numCell(m.fair_share),
      numCell(m.share_ratio === null ? null : m.share_ratio.toFixed(2)),
      cell(m.lost ? (m.why ? `lost (${m.why})` : "lost") : "live",
        { cls: m.lost ? "state-lost" : "state-ready" })));
      parts.push(el("table", { cls: "pool", data: { pool: p.name } },
        el("thead", null, head), el("tbody", null, ...rows)));
      const head2 = el("tr", null, ...["virtual system", "mode", "weight", "active", "standby",
        "backups", "operator's order"].map((h) => el("th", null, h)));
      const who = (vs, member) => {
        if (!member) return cell(null);
        const state = (vs.states || {})[member] || "";
        const text = state && state !== "ready" ? `${member} (${state})` : member;
        return cell(text, { cls: state ? `state-${state}` : "" });
      };
      const vsRows = systems.filter((vs) => vs.pool === p.name).map((vs) => {
        const active = who(vs, vs.active);
        const standby = who(vs, vs.standby);
        const prio = vs.priority;
        let order = cell(null);
        if (prio) {
          const list = prio.order || [];
          if (list.length === 1) {
            active.appendChild(el("span", { cls: "muted" }, prio.applied
              ? " (moved by operator)" : ` (moved to ${list[0]}: not live)`));
          } else if (prio.applied) {
            active.appendChild(el("span", { cls: "muted" }, " (operator's order)"));
          }
          if (prio.standby_on_its_site) {
            standby.appendChild(el("span", { cls: "muted" }, " (active's site)"));
          }
          order = cell(list.join(", ") + (prio.applied ? "" : " (none live)"),
            { cls: "priority", title: `set by ${prio.by || "?"}: ${prio.reason || "-"}` });
        }
        return el("tr", { cls: "vs", data: { vs: vs.name, active: vs.active || "" } },
          cell(vs.name), cell(vs.mode), numCell(vs.weight), active, standby,
          cell((vs.backups || []).join(", ")), order);
      });
      parts.push(el("table", { cls: "vs-roles", data: { pool: p.name } },
        el("thead", null, head2), el("tbody", null, ...vsRows)));
    }
    replace("virtual", ...parts);
  }

  function drawSitesOffline(sites) {
    replace("sites-offline", ...Object.keys(sites).sort().map((site) => {
      const a = sites[site] || {};
      return el("li", { cls: "state-site-offline" },
        `site ${site} offline since ${clock(a.at)} by ${a.by || "?"}: ${a.reason || "-"}`);
    }));
  }

  function drawNodes(input) {
    const { nodes, served } = input;
    const rows = nodes.map((n) => {
      const versions = ["CDS", "EDS", "LDS", "RDS"].map((t) => {
        const acked = n.acked ? n.acked[t] : null;
        const want = served[t];
        const behind = acked && want && acked !== want;
        return cell(acked, { cls: `version${behind ? " behind" : ""}`,
          title: behind ? `this replica serves ${want}` : "" });
      });
      const nack = n.last_nack;
      const nackText = nack ? `${nack.type || "?"} ${nack.version || "-"}: ${nack.error || ""}` : null;
      return el("tr", { cls: "node", data: { node: n.node } },
        cell(n.node, { cls: "mono" }), cell(n.replica), numCell(n.streams), ...versions,
        numCell(n.nacks), cell(nackText, { cls: nack ? "nack" : "" }));
    });
    if (!rows.length) rows.push(el("tr", null, el("td", { cls: "muted" }, "no Envoy connected")));
    document.querySelector("#nodes tbody").replaceChildren(...rows);
  }

  function drawSidecars(input) {
    const rows = input.sidecars.map((s) => el("tr", { cls: "sidecar", data: { cluster: s.cluster, member: s.member } },
      cell(s.cluster), cell(s.member, { cls: "mono" }),
      cell(s.ready ? "yes" : "no", { cls: s.ready ? "state-ready" : "state-syncing",
        title: (s.reasons || []).join("; ") }),
      numCell(s.revision), numCell(isNumber(s.lag_seconds) ? (s.lag_seconds * 1000).toFixed(1) : null),
      numCell(s.cached_sessions), numCell(s.owned_sessions), numCell(s.local_sessions),
      numCell(s.takeovers), numCell(s.write_conflicts),
      cell(`${s.errors ?? "-"}${s.last_error ? ` (${s.last_error})` : ""}`),
      numCell(s.stale ? `${s.age} stale` : s.age, { cls: s.stale ? "stale" : "" })));
    if (!rows.length) rows.push(el("tr", null, el("td", { cls: "muted" }, "no sidecar publishes statistics")));
    document.querySelector("#sidecars tbody").replaceChildren(...rows);
    replace("without-statistics", ...input.missing.map((m) => el("li", { cls: "stale" },
      `${m.cluster}/${m.member}: registered, no statistics published yet`)));
  }

  // -- failovers and their timelines ------------------------------------------------------

  function drawFailovers(failovers) {
    if (!failovers.length) {
      replace("failovers", el("p", { cls: "muted" }, "none in the last minutes"));
      return;
    }
    replace("failovers", ...failovers.map(failoverCard));
  }

  function failoverCard(f) {
    const outcome = ["converged", "timeout", "open"].includes(f.outcome) ? f.outcome : "open";
    const result = outcome === "converged"
      ? `every Envoy answered in ${ms(f.converged_ms)} ms`
      : outcome === "timeout" ? "not every Envoy answered in time" : "in progress";
    let envoys = `${f.acked}/${f.nodes_total} Envoys ACKed`;
    if (f.nacked) envoys += `, ${f.nacked} NACKed`;
    const firstTakeover = Math.min(...f.takeovers.map((t) => (isNumber(t.first) ? t.first : Infinity)));
    let takeovers = `${f.takeover_count} session takeover${f.takeover_count === 1 ? "" : "s"}`;
    if (Number.isFinite(firstTakeover) && isNumber(f.detected)) {
      takeovers += ` (first at ${ms((firstTakeover - f.detected) * 1000)} ms)`;
    }
    const card = el("div", { cls: "failover",
      data: { cluster: f.cluster, member: f.member, outcome, detected: f.detected } },
      el("div", { cls: "title" }, `${f.cluster}/${f.member}: ${f.cause || "?"} `,
        el("span", { cls: "muted" }, `(${f.from_state || "?"} \u2192 ${f.to_state || "?"}), seen at ${clock(f.detected, true)}`)),
      el("div", null, el("span", { cls: `outcome-${outcome}` }, result), ` \u00b7 ${envoys} \u00b7 ${takeovers}`,
        el("span", { cls: "muted" }, ` \u00b7 version ${f.version || "-"}, followed by replica ${f.replica || "?"}`)));
    if (isNumber(f.detected)) {
      const lanes = timelineLanes(f);
      const all = lanes.flatMap((l) => l.items.flatMap((i) => [i.from, i.to]));
      const cpEnd = Math.max(0, ...lanes.filter((l) => l.kind !== "takeover")
        .flatMap((l) => l.items.map((i) => i.to)));
      const lo = Math.min(0, ...all);
      const hi = Math.max(cpEnd, ...all);
      card.append(timelineSvg(lanes, lo, hi, "whole failover"));
      if (lo < 0 && cpEnd > 0 && cpEnd < (hi - lo) / 10) {
        // The takeovers came long before the control plane saw the loss (a lease must
        // end first): a second panel zoomed on detection, push and ACK, as the demo does.
        card.append(timelineSvg(lanes.filter((l) => l.kind !== "takeover"), 0, cpEnd,
          "zoomed on the control plane"));
      }
    }
    if (f.nodes_total > f.nodes.length) {
      card.append(el("div", { cls: "muted" }, `${f.nodes_total - f.nodes.length} more Envoy nodes not drawn`));
    }
    for (const n of f.nodes) {
      if (n.nack) {
        card.append(el("div", { cls: "nack-text", data: { node: n.node } },
          `${n.node} rejected version ${f.version || "-"}: ${n.nack}`));
      }
    }
    return card;
  }

  /** Lanes of items (ms from the loss as the control plane saw it). */
  function timelineLanes(f) {
    const at = (t) => (isNumber(t) ? (t - f.detected) * 1000 : null);
    const lanes = [];
    for (const t of f.takeovers) {
      const items = (t.times || []).map(([a, b]) => ({ from: at(a), to: at(b), cls: "takeover" }))
        .filter((i) => i.from !== null && i.to !== null);
      const drawn = t.count > items.length ? `; the first ${items.length} drawn` : "";
      lanes.push({ kind: "takeover", label: `takeovers by ${t.member} (${t.count})`,
        title: `${t.count} sessions taken over by member ${t.member}${drawn}`, items });
    }
    const cp = [];
    const rebuild = at(f.rebuild);
    const built = at(f.built);
    if (rebuild !== null) cp.push({ from: 0, to: rebuild, cls: "detect-span", tip: "loss seen \u2192 rebuild" });
    if (rebuild !== null && built !== null) cp.push({ from: rebuild, to: built, cls: "rebuild", tip: "rebuild" });
    lanes.push({ kind: "control-plane", label: "control plane", title: "loss seen, rebuild", items: cp });
    for (const n of f.nodes) {
      const items = [];
      const pushed = at(n.pushed);
      const sent = at(n.sent);
      const answered = at(n.answered);
      if (pushed !== null) items.push({ from: pushed, to: sent ?? pushed, cls: "push", tip: "xDS push" });
      if (sent !== null && answered !== null) {
        items.push({ from: sent, to: answered, cls: n.nack ? "nack" : "ack", tip: n.nack ? "NACK" : "ACK", dot: true });
      }
      lanes.push({ kind: "node", label: n.node, title: `Envoy ${n.node}`, items });
    }
    return lanes;
  }

  function niceStep(span) {
    const raw = span / 6;
    const power = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (raw <= m * power) return m * power;
    return 10 * power;
  }

  function timelineSvg(lanes, lo, hi, caption) {
    const width = 960;
    const left = 190;
    const right = 20;
    const laneHeight = 20;
    const top = 18;
    const height = top + lanes.length * laneHeight + 26;
    let span = hi - lo;
    if (!(span > 0.5)) span = 0.5;
    lo -= span * 0.04;
    hi = lo + span * 1.08;
    const plot = width - left - right;
    const x = (v) => left + ((v - lo) / (hi - lo)) * plot;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "timeline" });
    root.append(svg("title", {}, `failover timeline, ${caption}`));
    root.append(svg("text", { x: 4, y: 12, class: "axis" }, caption));
    const step = niceStep(hi - lo);
    const bottom = top + lanes.length * laneHeight;
    for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) {
      const px = x(t);
      root.append(svg("line", { x1: px, x2: px, y1: top, y2: bottom, class: "grid" }));
      root.append(svg("text", { x: px, y: bottom + 14, "text-anchor": "middle", class: "axis" },
        `${ms(Math.abs(t) < step / 1000 ? 0 : t)}`));
    }
    root.append(svg("text", { x: width - right, y: bottom + 25, "text-anchor": "end", class: "axis" }, "ms"));
    lanes.forEach((lane, i) => {
      const y = top + i * laneHeight;
      const label = svg("text", { x: left - 6, y: y + 14, "text-anchor": "end" }, short(lane.label, LABEL_CHARS));
      label.append(svg("title", {}, lane.title || lane.label));
      root.append(label);
      for (const item of lane.items) {
        if (item.to < lo || item.from > hi) continue;
        const from = x(Math.max(lo, item.from));
        const to = x(Math.min(hi, item.to));
        const box = svg("rect", { x: from, y: y + 4, width: Math.max(2, to - from), height: laneHeight - 8, class: item.cls });
        box.append(svg("title", {}, `${item.tip || lane.label}: ${ms(item.from)} \u2192 ${ms(item.to)} ms`));
        root.append(box);
        if (item.dot) root.append(svg("circle", { cx: to, cy: y + laneHeight / 2, r: 3.5, class: item.cls }));
      }
    });
    if (lo <= 0 && hi >= 0) {
      const px = x(0);
      const mark = svg("line", { x1: px, x2: px, y1: top - 4, y2: bottom, class: "detect" });
      mark.append(svg("title", {}, "the control plane saw the loss"));
      root.append(mark);
    }
    return root;
  }

  // -- the loop -----------------------------------------------------------------------------

  function render(data) {
    const status = data.status || {};
    const sync = data.sync || {};
    drawHeader(data);
    const warnings = [...new Set([...(status.warnings || []), ...(sync.warnings || [])])];
    section("warnings", warnings, drawWarnings);
    section("clusters", { clusters: status.clusters || [], modelError: status.model_error || null,
      modelFound: status.model_found !== false }, drawClusters);
    section("sites", status.sites_offline || {}, drawSitesOffline);
    const virtual = data.virtual || {};
    section("virtual", { pools: virtual.pools || [], systems: virtual.virtual_systems || [] },
      drawVirtual);
    section("failovers", status.failovers || [], drawFailovers);
    section("nodes", { nodes: status.nodes || [], served: (data.replica || {}).versions || {} }, drawNodes);
    section("sidecars", {
      sidecars: (sync.sidecars || []).map((s) => ({ ...s,
        age: isNumber(s.age_seconds) ? Math.round(s.age_seconds) : null, age_seconds: undefined })),
      missing: sync.without_statistics || [],
    }, drawSidecars);
    updates += 1;
    document.body.dataset.updates = String(updates);
  }

  function setLink(state, text) {
    const link = document.getElementById("link");
    link.className = `link ${state}`;
    link.textContent = text;
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.hidden = message === null;
    box.textContent = message === null ? "" : message;
  }

  async function poll() {
    try {
      const response = await fetch(DATA_URL, { cache: "no-store", headers: { Accept: "application/json" } });
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      if (!response.ok || body === null) {
        throw new Error(body && body.error ? String(body.error) : `HTTP ${response.status}`);
      }
      render(body);
      showError(null);
      setLink("live", `live, every ${INTERVAL_MS / 1000} s`);
    } catch (error) {
      showError(`cannot read the view: ${error.message}; retrying`);
      setLink("down", "not updating");
    } finally {
      window.setTimeout(poll, INTERVAL_MS);
    }
  }

  poll();
})();
