// newsmon console: one page, drawn from the JSON API. No framework, no build step.
// Every element is made with h(), which sets text as text: nothing from a feed becomes markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { session: null, render: 0 };
let keyHandler = null; // the current page's keyboard shortcuts, if any

// --- small helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// A link that came from a feed: only http(s) becomes a link (a feed may say "javascript:...").
function external(url, label) {
  let scheme = "";
  try { scheme = new URL(url).protocol; } catch (e) { scheme = ""; }
  if (scheme !== "http:" && scheme !== "https:") return label === url ? url : `${label} (${url})`;
  return h("a", { href: url, rel: "noreferrer noopener", target: "_blank" }, label);
}

const canEdit = () => state.session && state.session.role === "admin";
const main = () => document.getElementById("main");
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const num = (x) => Number(x).toLocaleString("en");

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.parse(iso) - Date.now()) / 1000;
  const a = Math.abs(s);
  const text = a < 60 ? `${Math.round(a)} s` : a < 3600 ? `${Math.round(a / 60)} min` : a < 86400 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return s < 0 ? `${text} ago` : `in ${text}`;
}
const when = (iso) => h("time", { datetime: iso || "", title: iso || "" }, ago(iso));

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || "") };
}
const link = (path, params) => "#/" + path.map(encodeURIComponent).join("/") + (params ? "?" + new URLSearchParams(params) : "");

// --- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, data) {
    super(describe(status, data));
    this.status = status;
  }
}

function describe(status, data) {
  const d = data && data.detail;
  let text = "";
  if (Array.isArray(d)) {
    text = d.map((e) => `${(e.loc || []).filter((x) => x !== "body" && x !== "query").join(".") || "input"}: ${e.msg}`).join("; ");
  } else if (d) text = String(d);
  const what = { 401: "Not logged in", 403: "Not allowed", 404: "Not found", 409: "Conflict", 413: "Too large", 422: "Invalid input", 429: "Too many requests" }[status] || "Error";
  return `${status} ${what}${text ? ": " + text : ""}`;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session && state.session.csrf) headers["X-CSRF-Token"] = state.session.csrf;
  let response;
  try {
    response = await fetch(path, { method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { detail: "newsmon did not answer (" + err.message + ")" });
  }
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && state.session && state.session.mode === "keys") {
      state.session = { mode: "keys", authenticated: false };
      drawWho();
    }
    throw error;
  }
  return data;
}

function notify(message, kind = "error") {
  const box = document.getElementById("notice");
  box.replaceChildren(h("span", { text: message }), h("button", { type: "button", class: "link", onclick: () => { box.hidden = true; } }, "Dismiss"));
  box.className = "notice " + kind;
  box.hidden = false;
}
function clearNotice() { document.getElementById("notice").hidden = true; }

// Run an action from a button: errors are shown, the button is busy meanwhile.
async function act(button, work, done) {
  if (button) button.disabled = true;
  try {
    const result = await work();
    if (done) notify(done, "ok");
    return result;
  } catch (err) {
    notify(err.message);
    if (err.status === 401 && state.session.mode === "keys") location.hash = "#/login";
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// --- session ---------------------------------------------------------------------------------

function drawWho() {
  const who = document.getElementById("who");
  const s = state.session;
  if (!s) return who.replaceChildren();
  if (s.mode === "open") return who.replaceChildren(h("span", { class: "badge warn", title: "NEWSMON_API_KEYS is empty: the API is open on this machine" }, "open mode: no API keys"));
  if (!s.authenticated) return who.replaceChildren(h("a", { href: "#/login" }, "Log in"));
  who.replaceChildren(
    h("span", { id: "who-name" }, `${s.name} `, h("span", { class: "badge " + (s.role === "admin" ? "admin" : "") }, s.role)),
    h("button", { type: "button", class: "link", id: "logout", onclick: logout }, "Log out"),
  );
}

async function logout() {
  await act(null, () => api("DELETE", "/console/session"));
  state.session = { mode: "keys", authenticated: false };
  drawWho();
  location.hash = "#/login";
}

function pageLogin(view) {
  const input = h("input", { id: "api-key", type: "password", name: "key", autocomplete: "off", required: true, "aria-describedby": "key-help" });
  const form = h("form", {
    class: "card narrow",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const session = await act(form.querySelector("button"), () => api("POST", "/console/session", { key: input.value }));
      input.value = "";
      if (session) {
        state.session = session;
        clearNotice();
        drawWho();
        // Back to the page that asked for the login, if one did.
        const target = location.hash && location.hash !== "#/login" ? location.hash : "#/topics";
        if (location.hash === target) route();
        else location.hash = target;
      }
    },
  },
  h("h1", {}, "Log in"),
  h("label", { for: "api-key" }, "API key"),
  input,
  h("p", { id: "key-help", class: "muted" }, "A key from NEWSMON_API_KEYS. It becomes a session cookie for this browser; the key itself is not kept here."),
  h("button", { type: "submit" }, "Log in"));
  view.append(form);
  view.afterAttach = () => input.focus();
}

// --- topics ----------------------------------------------------------------------------------

async function pageTopics(view) {
  const topics = await api("GET", "/topics");
  view.append(h("h1", {}, "Topics"));
  const rows = topics.map((t) => h("tr", {},
    h("td", {}, h("a", { href: link(["topics", t.slug]) }, t.name), h("div", { class: "muted" }, t.slug)),
    h("td", {}, h("span", { class: "badge " + (t.status === "draft" ? "warn" : "ok") }, t.status), t.enabled ? "" : h("span", { class: "badge" }, "disabled")),
    h("td", { class: "num" }, fmt(t.threshold, 2)),
    h("td", { class: "num" }, "v" + t.version),
    h("td", {}, h("a", { href: link(["review", t.slug]) }, "Review"))));
  view.append(h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "Topic"), h("th", {}, "Status"), h("th", { class: "num" }, "Threshold"), h("th", { class: "num" }, "Version"), h("th", {}, ""))),
    h("tbody", {}, rows))));
  if (canEdit()) view.append(newTopicForm());
}

function newTopicForm() {
  const field = (id, label, el) => [h("label", { for: id }, label), el];
  const slug = h("input", { id: "new-slug", required: true, pattern: "[a-z0-9][a-z0-9-]{0,62}", "data-edit": "" });
  const name = h("input", { id: "new-name", required: true, "data-edit": "" });
  const description = h("textarea", { id: "new-description", rows: 2, required: true, "data-edit": "" });
  const examples = h("textarea", { id: "new-examples", rows: 3, required: true, "data-edit": "" });
  const form = h("form", {
    class: "card",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const body = { slug: slug.value, name: name.value, description: description.value, examples: lines(examples.value), status: "draft" };
      const created = await act(form.querySelector("button"), () => api("POST", "/topics", body));
      if (created) location.hash = link(["topics", created.slug]);
    },
  }, h("h2", {}, "New draft topic"),
  h("p", { class: "muted" }, "A draft is scored only in previews, the review queue and look-ups until you make it live."),
  field("new-slug", "Slug", slug), field("new-name", "Name", name), field("new-description", "Description", description),
  field("new-examples", "Examples (one per line)", examples), h("button", { type: "submit" }, "Create draft"));
  return form;
}

const lines = (text) => text.split("\n").map((x) => x.trim()).filter(Boolean);
const terms = (text) => text.split(/[\n,]/).map((x) => x.trim()).filter(Boolean);

function histogramSvg(hist, saved, draft) {
  const W = 600, H = 160, pad = 18;
  const max = Math.max(1, ...hist.counts);
  const bw = (W - 2 * pad) / hist.bins;
  const x = (t) => pad + t * (W - 2 * pad);
  // A square-root scale: unrelated articles pile up near 0, and the few near the line matter.
  const y = (n) => (H - pad) - Math.sqrt(n / max) * (H - 2 * pad);
  const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "histogram", role: "img", "aria-label": `Scores of ${num(hist.counts.reduce((a, b) => a + b, 0))} recent articles, threshold ${fmt(draft, 2)}` });
  hist.counts.forEach((n, i) => {
    if (!n) return;
    const above = (i + 1) / hist.bins > draft + 1e-9 && i / hist.bins >= draft - 1e-9;
    svg.append(h("svg:rect", { x: x(i / hist.bins) + 0.5, y: y(n), width: Math.max(1, bw - 1), height: (H - pad) - y(n), class: above ? "bar above" : "bar" },
      h("svg:title", {}, `${fmt(i / hist.bins, 2)}–${fmt((i + 1) / hist.bins, 2)}: ${n}`)));
  });
  svg.append(h("svg:line", { x1: pad, x2: W - pad, y1: H - pad, y2: H - pad, class: "axis" }));
  for (const t of [0, 0.25, 0.5, 0.75, 1]) svg.append(h("svg:text", { x: x(t), y: H - 4, class: "tick" }, fmt(t, 2)));
  svg.append(h("svg:line", { x1: x(saved), x2: x(saved), y1: 4, y2: H - pad, class: "saved-line" }, h("svg:title", {}, `saved threshold ${fmt(saved, 2)}`)));
  svg.append(h("svg:line", { x1: x(draft), x2: x(draft), y1: 4, y2: H - pad, class: "threshold-line", id: "threshold-line" }, h("svg:title", {}, `threshold ${fmt(draft, 2)}`)));
  return svg;
}

// Articles at or above ``t`` (two decimals) in the histogram: exact, since scores bin on edges.
const matchingAt = (hist, t) => hist.counts.slice(Math.round(t * hist.bins)).reduce((a, b) => a + b, 0);

async function pageTopic(view, slug, params) {
  const articles = Number(params.get("articles") || 2000);
  const [topic, history] = await Promise.all([api("GET", `/topics/${encodeURIComponent(slug)}`), api("GET", `/topics/${encodeURIComponent(slug)}/history?limit=30`)]);
  const edit = canEdit();
  view.append(h("p", { class: "crumbs" }, h("a", { href: "#/topics" }, "Topics"), " / ", slug));
  view.append(h("h1", {}, topic.name, " ",
    h("span", { class: "badge " + (topic.status === "draft" ? "warn" : "ok"), id: "topic-status" }, topic.status),
    topic.enabled ? "" : h("span", { class: "badge" }, "disabled"),
    " ", h("span", { class: "version", id: "topic-version" }, "v" + topic.version)));

  // The histogram, the threshold and what moving it changes.
  const chart = h("div", { class: "chart" });
  const summary = h("p", { id: "preview-summary", class: "summary", "aria-live": "polite" }, "Replaying recent articles…");
  const lists = h("div", { class: "columns", id: "preview-lists" });
  const sizes = h("select", { id: "preview-articles", "aria-label": "Recent articles to replay", onchange: (ev) => { location.hash = link(["topics", slug], { articles: ev.target.value }); } },
    [500, 1000, 2000, 5000, 10000].map((n) => h("option", { value: n, selected: n === articles }, `last ${num(n)} articles`)));
  const section = h("section", { class: "card", "aria-labelledby": "scores-h" }, h("h2", { id: "scores-h" }, "Recent articles' scores"),
    h("div", { class: "row" }, sizes, h("a", { href: link(["review", slug]) }, "Review queue →")), chart, summary, lists);
  view.append(section);

  let threshold = topic.threshold;
  let hist = null;
  let seq = 0;
  let timer = null;
  const slider = edit ? h("input", { type: "range", id: "threshold", min: 0, max: 1, step: 0.01, value: threshold, "aria-label": "Threshold", "data-edit": "" }) : null;
  const number = edit ? h("input", { type: "number", id: "threshold-value", min: 0, max: 1, step: 0.01, value: fmt(threshold, 2), "aria-label": "Threshold value", "data-edit": "" }) : null;
  let now = 0, replayed = 0;

  function drawChart() {
    if (!hist) return;
    chart.replaceChildren(histogramSvg(hist, topic.threshold, threshold));
  }
  function estimate() {
    if (!hist) return;
    const at = matchingAt(hist, threshold);
    summary.textContent = `Of ${num(replayed)} recent articles, ${num(now)} match now (threshold ${fmt(topic.threshold, 2)}); at ${fmt(threshold, 2)} about ${num(at)} would (${hist.vetoed} ruled out by keywords)…`;
  }
  function articleList(title, id, items, total) {
    return h("div", { id },
      h("h3", {}, `${title} (${total}${total > 20 ? ", the first 20" : ""})`),
      items.length ? h("ul", { class: "plain" }, items.slice(0, 20).map((a) => h("li", {},
        h("a", { href: link(["article", a.article_id]) }, a.title || a.article_id), " ",
        h("span", { class: "muted" }, `${fmt(a.score_before)} → ${fmt(a.score_after)}`)))) : h("p", { class: "muted" }, "none"));
  }
  async function preview(draft) {
    const mine = ++seq;
    try {
      const p = await api("POST", `/topics/${encodeURIComponent(slug)}/preview?articles=${articles}&show=20`, draft);
      if (mine !== seq) return;
      hist = p.histogram; now = p.matching_now; replayed = p.articles;
      drawChart();
      const up = p.would_match_total, down = p.would_stop_matching_total;
      summary.replaceChildren(
        `Of ${num(p.articles)} recent articles, `, h("strong", { id: "matching-now" }, num(p.matching_now)), " match now; with this draft ",
        h("strong", { id: "matching-draft" }, num(p.matching_with_draft)), ": ",
        h("span", { class: "up", id: "would-start" }, `+${up} would start`), ", ",
        h("span", { class: "down", id: "would-stop" }, `−${down} would stop`), ` matching (${p.histogram.vetoed} ruled out by keywords).`);
      lists.replaceChildren(articleList("Would start matching", "would-match", p.would_match, up), articleList("Would stop matching", "would-stop-matching", p.would_stop_matching, down));
    } catch (err) {
      if (mine === seq) { summary.textContent = err.message; notify(err.message); }
    }
  }
  const schedule = () => { clearTimeout(timer); timer = setTimeout(() => preview(draftOf()), 250); };
  function moveTo(t) {
    threshold = Math.min(1, Math.max(0, Math.round(t * 100) / 100));
    if (slider) slider.value = threshold;
    if (number) number.value = fmt(threshold, 2);
    drawChart(); estimate(); schedule();
  }
  if (edit) {
    slider.addEventListener("input", () => moveTo(Number(slider.value)));
    number.addEventListener("change", () => moveTo(Number(number.value)));
    section.insertBefore(h("div", { class: "row threshold" }, h("label", { for: "threshold" }, "Threshold"), slider, number), summary);
  }

  // The definition: a form for an admin, plain text for a read key.
  const fields = [
    ["name", "Name", "input", (t) => t.name, (v) => v.trim()],
    ["description", "Description", "textarea", (t) => t.description, (v) => v],
    ["examples", "Examples (one per line)", "textarea", (t) => t.examples.join("\n"), lines],
    ["counter_examples", "Counter-examples (one per line)", "textarea", (t) => t.counter_examples.join("\n"), lines],
    ["require_any", "Require any of these terms (one per line; a * at the end of a word matches any ending)", "textarea", (t) => t.require_any.join("\n"), lines],
    ["require_also", "Also require one term of each group (a group per line, terms separated by commas)", "textarea", (t) => t.require_also.map((g) => g.join(", ")).join("\n"), (v) => lines(v).map(terms)],
    ["exclude_any", "Exclude articles mentioning (one per line; {US_STATE} or {AU_STATE} matches any of those places)", "textarea", (t) => t.exclude_any.join("\n"), lines],
  ];
  const inputs = {};
  function draftOf() {
    const draft = {};
    if (threshold !== topic.threshold) draft.threshold = threshold;
    for (const [key, , , show, read] of fields) {
      if (!inputs[key]) continue;
      const value = read(inputs[key].value);
      if (JSON.stringify(value) !== JSON.stringify(read(show(topic)))) draft[key] = value;
    }
    return draft;
  }
  const def = h("section", { class: "card", "aria-labelledby": "def-h" }, h("h2", { id: "def-h" }, "Definition"));
  if (edit) {
    const form = h("form", { id: "topic-form", onsubmit: (ev) => ev.preventDefault() });
    for (const [key, label, kind, show] of fields) {
      const id = "f-" + key;
      inputs[key] = h(kind, { id, name: key, rows: kind === "textarea" ? (key === "description" ? 3 : 5) : null, value: show(topic), "data-edit": "" });
      form.append(h("label", { for: id }, label), inputs[key]);
    }
    const save = h("button", { type: "button", id: "save-topic", "data-edit": "", onclick: async () => {
      const draft = draftOf();
      if (!Object.keys(draft).length) return notify("Nothing changed.", "ok");
      const saved = await act(save, () => api("PATCH", `/topics/${encodeURIComponent(slug)}`, draft), topic.status === "draft" ? "Draft saved." : "Saved: the new version is live.");
      if (saved) route();
    } }, topic.status === "draft" ? "Save draft" : "Save (goes live)");
    const previewButton = h("button", { type: "button", class: "secondary", id: "preview-topic", onclick: () => preview(draftOf()) }, "Preview");
    const buttons = h("div", { class: "row" }, previewButton, save);
    if (topic.status === "draft") {
      const publish = h("button", { type: "button", id: "publish-topic", "data-edit": "", onclick: async () => {
        if (Object.keys(draftOf()).length) return notify("Save the draft first: publishing makes the saved draft live.");
        if (await act(publish, () => api("POST", `/topics/${encodeURIComponent(slug)}/publish`), "Published: the topic is live.")) route();
      } }, "Make live");
      buttons.append(publish);
    }
    const toggle = h("button", { type: "button", class: "secondary", "data-edit": "", onclick: async () => {
      if (await act(toggle, () => api("POST", `/topics/${encodeURIComponent(slug)}/${topic.enabled ? "disable" : "enable"}`))) route();
    } }, topic.enabled ? "Disable" : "Enable");
    buttons.append(toggle);
    form.addEventListener("input", schedule);
    form.append(buttons);
    def.append(form);
  } else {
    const dl = h("dl", { class: "definition" });
    for (const [key, label, , show] of fields) dl.append(h("dt", {}, label.replace(/ \(.*/, "")), h("dd", {}, show(topic) || "–"));
    dl.append(h("dt", {}, "Threshold"), h("dd", {}, fmt(topic.threshold, 2)));
    def.append(dl);
  }
  view.append(def);
  view.append(historySection(history));
  await preview({});
}

function historySection(history) {
  const items = history.items.map((v) => {
    const changes = Object.entries(v.changes).map(([field, c]) => h("li", {}, h("strong", {}, field), ": ", changeText(c.before, c.after)));
    const labels = v.labels.map((l) => h("li", {}, `labelled ${l.relevant ? "relevant" : "not relevant"}: `, h("a", { href: link(["article", l.article_id]) }, l.title || l.article_id), l.undone ? " (undone)" : ""));
    // A creation "changes" every field: its definition is folded away.
    const whole = v.change === "created" || v.change === "seeded";
    const list = changes.length || labels.length ? h("ul", { class: "changes" }, changes, labels) : null;
    return h("li", { class: "version-entry", "data-version": v.version },
      h("div", {}, h("strong", {}, "v" + v.version), " · ", v.change, v.at ? [" · ", when(v.at)] : "", v.actor ? h("span", { class: "muted" }, " · " + v.actor) : ""),
      whole && list ? h("details", {}, h("summary", {}, "definition"), list) : list);
  });
  return h("section", { class: "card", "aria-labelledby": "hist-h" }, h("h2", { id: "hist-h" }, "Version history"),
    items.length ? h("ol", { class: "history", id: "history" }, items) : h("p", { class: "muted" }, "No versions recorded yet."));
}

function changeText(before, after) {
  if (Array.isArray(before) || Array.isArray(after)) {
    const b = (before || []).map(JSON.stringify), a = (after || []).map(JSON.stringify);
    const added = a.filter((x) => !b.includes(x)), removed = b.filter((x) => !a.includes(x));
    const show = (xs) => xs.map((x) => JSON.parse(x)).map((x) => (Array.isArray(x) ? x.join(", ") : x)).join(" | ");
    if (!a.length && !b.length) return "none";
    return [added.length ? h("span", { class: "up" }, `+ ${show(added)} `) : "", removed.length ? h("span", { class: "down" }, `− ${show(removed)}`) : "", !added.length && !removed.length ? "reordered" : ""];
  }
  const s = (x) => (x === null || x === undefined ? "unset" : typeof x === "number" ? fmt(x, 2) : String(x));
  return before === undefined || before === null ? s(after) : `${s(before)} → ${s(after)}`;
}

// --- evidence --------------------------------------------------------------------------------

function evidence(ev) {
  if (!ev) return null;
  const dl = h("dl", { class: "evidence" });
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") dl.append(h("dt", {}, k), h("dd", {}, v)); };
  add("Passage", h("q", {}, ev.passage));
  add("Nearest example", ev.nearest_positive ? [h("q", {}, ev.nearest_positive), ` (${fmt(ev.positive_similarity)})`] : null);
  add("Nearest counter-example", ev.nearest_negative ? [h("q", {}, ev.nearest_negative), ` (${fmt(ev.negative_similarity)})`] : null);
  add("Required term found", ev.required_term);
  add("Ruled out", ev.rejected_by);
  add("Vote / calibrated", ev.vote !== undefined && ev.vote !== null ? `${fmt(ev.vote)} / ${fmt(ev.calibrated)}` : null);
  const lab = (l) => (l ? [h("a", { href: link(["article", l.article_id]) }, l.title || l.article_id), ` (${fmt(l.similarity)})`] : null);
  add("Like an article labelled relevant", lab(ev.relevant_label));
  add("Like an article labelled not relevant", lab(ev.not_relevant_label));
  return dl;
}

function scoreLine(s) {
  return h("span", { class: "score " + (s.matched ? "match" : "") }, `${fmt(s.score)} / ${fmt(s.threshold, 2)} ${s.matched ? "✓ matches" : "✗ no match"}`);
}

// --- review ----------------------------------------------------------------------------------

async function pageReview(view, slug) {
  const topics = await api("GET", "/topics");
  view.append(h("h1", {}, "Review"));
  const picker = h("nav", { class: "tabs", "aria-label": "Topic to review" }, topics.map((t) => h("a", { href: link(["review", t.slug]), "aria-current": t.slug === slug ? "page" : null }, t.name)));
  view.append(picker);
  if (!slug) {
    view.append(h("p", { class: "muted" }, "Pick a topic: its queue holds the recent articles it is least sure about, alternating above and below the threshold."));
    return;
  }
  const review = await api("GET", `/topics/${encodeURIComponent(slug)}/review?limit=20`);
  const version = h("span", { id: "review-version", class: "version" }, "v" + review.topic_version);
  view.append(h("p", {}, `Topic ${slug} `, version, ` · threshold ${fmt(review.threshold, 2)} · ${num(review.articles)} recent articles considered`));
  if (canEdit()) view.append(h("p", { class: "muted keys" }, "Keyboard: ", h("kbd", {}, "j"), "/", h("kbd", {}, "k"), " next/previous, ", h("kbd", {}, "r"), " relevant, ", h("kbd", {}, "n"), " not relevant. Focus moves to the next article after each label."));
  if (!review.items.length) {
    view.append(h("p", { class: "muted" }, "Nothing to review: every recent article the keywords admit is labelled."));
    return;
  }
  const list = h("ol", { class: "review", id: "review-list" });
  const cards = review.items.map((item) => {
    const card = h("li", { class: "card review-item", tabindex: 0, "data-article": item.article_id, "aria-label": item.title },
      h("h2", {}, h("a", { href: link(["article", item.article_id]) }, item.title || item.article_id)),
      h("p", {}, scoreLine(item.score), " · ", item.side, " the threshold · ", when(item.classified_at), " · ", item.link ? external(item.link, "source") : ""),
      evidence(item.score.evidence));
    if (canEdit()) {
      card.append(h("div", { class: "row" },
        h("button", { type: "button", class: "relevant", "data-edit": "", onclick: () => label(card, true) }, "Relevant (r)"),
        h("button", { type: "button", class: "secondary not-relevant", "data-edit": "", onclick: () => label(card, false) }, "Not relevant (n)")));
    }
    return card;
  });
  list.append(...cards);
  view.append(list);

  async function label(card, relevant) {
    if (card.classList.contains("done")) return;
    const done = await act(null, () => api("POST", `/topics/${encodeURIComponent(slug)}/labels`, { article_id: card.dataset.article, relevant }));
    if (!done) return;
    card.classList.add("done");
    card.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    card.append(h("p", { class: "labelled" }, `Labelled ${relevant ? "relevant" : "not relevant"}: the topic is now v${done.topic_version}.`));
    version.textContent = "v" + done.topic_version;
    const next = cards.slice(cards.indexOf(card) + 1).concat(cards).find((c) => !c.classList.contains("done"));
    if (next) next.focus();
  }
  const current = () => cards.indexOf(document.activeElement.closest ? document.activeElement.closest(".review-item") : null);
  keyHandler = (ev) => {
    const i = current();
    if (ev.key === "j" || ev.key === "ArrowDown") { (cards[Math.min(cards.length - 1, i + 1)] || cards[0]).focus(); ev.preventDefault(); }
    else if (ev.key === "k" || ev.key === "ArrowUp") { (cards[Math.max(0, i - 1)] || cards[0]).focus(); ev.preventDefault(); }
    else if ((ev.key === "r" || ev.key === "n") && canEdit() && i >= 0) { label(cards[i], ev.key === "r"); ev.preventDefault(); }
  };
  view.afterAttach = () => cards[0].focus();
}

// --- articles and matches --------------------------------------------------------------------

async function pageArticles(view, params) {
  const q = params.get("q") || "";
  view.append(h("h1", {}, "Articles"));
  const input = h("input", { id: "article-q", type: "search", name: "q", value: q, placeholder: "words of the title", "aria-label": "Words of the title" });
  view.append(h("form", { class: "row", role: "search", onsubmit: (ev) => { ev.preventDefault(); location.hash = link(["articles"], { q: input.value }); } },
    input, h("button", { type: "submit" }, "Search")));
  if (!q.trim()) {
    view.append(h("p", { class: "muted" }, "Search the recently classified articles by words of their title; each shows every topic's score and evidence: why it did or did not match."));
    view.afterAttach = () => input.focus();
    return;
  }
  const found = await api("GET", `/articles?q=${encodeURIComponent(q)}&limit=50`);
  view.append(h("p", { class: "muted" }, `${found.length} found${found.length === 50 ? " (the newest 50)" : ""}`));
  view.append(h("ul", { class: "plain results", id: "article-results" }, found.map((a) => h("li", { class: "card" },
    h("h2", {}, h("a", { href: link(["article", a.article_id]) }, a.title || a.article_id)),
    h("p", { class: "muted" }, when(a.classified_at)),
    h("p", {}, a.scores.map((s) => h("span", { class: "chip " + (s.matched ? "match" : "") }, `${s.topic} ${fmt(s.score)}`)))))));
}

async function pageArticle(view, id) {
  const a = await api("GET", `/articles/${encodeURIComponent(id)}`);
  view.append(h("p", { class: "crumbs" }, h("a", { href: "#/articles" }, "Articles"), " / ", a.article_id));
  view.append(h("h1", {}, a.title || a.article_id));
  view.append(h("p", {}, a.link ? external(a.link, a.link) : "", " · classified ", when(a.classified_at), ` · ${a.passages} passages`));
  for (const s of a.scores) {
    const d = a.decided[s.topic];
    view.append(h("section", { class: "card" },
      h("h2", {}, h("a", { href: link(["topics", s.topic]) }, s.topic), " ", scoreLine(s)),
      d ? h("p", { class: "muted" }, `When it arrived: ${fmt(d.score)} at v${d.version}, ${d.matched ? "matched" : "no match"}`) : null,
      evidence(s.evidence)));
  }
  if (a.matches.length) view.append(h("section", { class: "card" }, h("h2", {}, "Matches"), h("ul", {}, a.matches.map((m) => h("li", {}, `${m.topic} v${m.topic_version}: ${fmt(m.score)} `, when(m.matched_at))))));
  view.append(h("section", { class: "card" }, h("h2", {}, "Labels"), a.labels.length
    ? h("ul", {}, a.labels.map((l) => h("li", {}, `${l.topic}: ${l.relevant ? "relevant" : "not relevant"} by ${l.actor} (${l.source}) `, when(l.created_at), l.undone_at ? " (undone)" : "")))
    : h("p", { class: "muted" }, "none")));
}

async function pageMatches(view, params) {
  const topic = params.get("topic") || "";
  const offset = Number(params.get("offset") || 0);
  const limit = 25;
  const [topics, page] = await Promise.all([api("GET", "/topics"), api("GET", `/matches?limit=${limit}&offset=${offset}${topic ? "&topic=" + encodeURIComponent(topic) : ""}`)]);
  view.append(h("h1", {}, "Matches"));
  view.append(h("nav", { class: "tabs", "aria-label": "Topic" }, h("a", { href: link(["matches"]), "aria-current": topic ? null : "page" }, "All"),
    topics.map((t) => h("a", { href: link(["matches"], { topic: t.slug }), "aria-current": t.slug === topic ? "page" : null }, t.name))));
  // The feedback each match got: the labels of the topics on this page.
  const slugs = [...new Set(page.items.map((m) => m.topic))];
  const labels = {};
  await Promise.all(slugs.map(async (s) => {
    try {
      const got = await api("GET", `/topics/${encodeURIComponent(s)}/labels?limit=500`);
      for (const l of got.items) labels[`${s}|${l.article_id}`] = l;
    } catch (_) { /* a deleted topic keeps its matches, not its labels */ }
  }));
  view.append(pager(page.total, limit, offset, (o) => link(["matches"], { topic, offset: o })));
  view.append(h("ul", { class: "plain", id: "match-list" }, page.items.map((m) => {
    const l = labels[`${m.topic}|${m.article_id}`];
    return h("li", { class: "card" },
      h("h2", {}, h("a", { href: link(["article", m.article_id]) }, m.title || m.article_id)),
      h("p", {}, h("span", { class: "chip match" }, `${m.topic} v${m.topic_version}`), ` ${fmt(m.score)} / ${fmt(m.threshold, 2)} · `, when(m.matched_at), " · ",
        l ? h("span", { class: "badge " + (l.relevant ? "ok" : "bad") }, l.relevant ? "labelled relevant" : "labelled not relevant") : h("span", { class: "muted" }, "no feedback")),
      h("details", {}, h("summary", {}, "Evidence"), evidence(m.evidence)));
  })));
}

function pager(total, limit, offset, href) {
  const to = Math.min(total, offset + limit);
  return h("p", { class: "pager" }, `${total ? offset + 1 : 0}–${to} of ${num(total)} `,
    offset > 0 ? h("a", { href: href(Math.max(0, offset - limit)) }, "← newer") : "", " ",
    to < total ? h("a", { href: href(offset + limit) }, "older →") : "");
}

// --- feeds -----------------------------------------------------------------------------------

const FEED_ORDER = { failing: 0, retrying: 1, new: 2, paused: 3, ok: 4 };

async function pageFeeds(view) {
  const feeds = await api("GET", "/feeds");
  feeds.sort((a, b) => FEED_ORDER[a.state] - FEED_ORDER[b.state] || a.title.localeCompare(b.title));
  const counts = {};
  for (const f of feeds) counts[f.state] = (counts[f.state] || 0) + 1;
  view.append(h("h1", {}, "Feeds"));
  view.append(h("p", {}, Object.keys(FEED_ORDER).filter((s) => counts[s]).map((s) => h("span", { class: "badge " + stateClass(s) }, `${counts[s]} ${s}`))));
  if (canEdit()) view.append(addFeedForm());
  view.append(h("ul", { class: "grid plain", id: "feed-list" }, feeds.map(feedCard)));
  if (!feeds.length) view.append(h("p", { class: "muted" }, "No feeds."));
}

const stateClass = (s) => ({ failing: "bad", retrying: "warn", ok: "ok", paused: "", new: "" })[s];

function feedCard(f) {
  const card = h("li", { class: "card feed", "data-feed": f.id, "data-state": f.state },
    h("h2", {}, f.title || f.url, " ", h("span", { class: "badge " + stateClass(f.state) }, f.state)),
    h("p", { class: "url" }, f.url),
    f.last_error ? h("p", { class: "error feed-error" }, f.last_error) : null,
    h("dl", { class: "facts" },
      h("dt", {}, "Last poll"), h("dd", {}, when(f.last_polled_at), f.last_status ? ` (HTTP ${f.last_status})` : ""),
      h("dt", {}, "Last success"), h("dd", {}, when(f.last_success_at)),
      h("dt", {}, "Next poll"), h("dd", {}, f.paused ? "paused" : when(f.next_poll_at)),
      h("dt", {}, "Interval"), h("dd", {}, `${Math.round(f.interval_s)} s`),
      h("dt", {}, "Failures in a row"), h("dd", {}, f.consecutive_failures),
      h("dt", {}, "Counters"), h("dd", {}, `${f.fetches} fetches, ${f.not_modified} not modified, ${f.errors} errors, ${f.items_published} published`),
      f.tags.length ? [h("dt", {}, "Tags"), h("dd", {}, f.tags.join(", "))] : null));
  if (canEdit()) {
    const post = (what, done) => async (ev) => {
      const updated = await act(ev.target, () => api("POST", `/feeds/${f.id}/${what}`), done);
      if (updated) card.replaceWith(feedCard(updated));
    };
    card.append(h("div", { class: "row" },
      h("button", { type: "button", "data-edit": "", onclick: post("poll", "Polled.") }, "Poll now"),
      f.paused ? h("button", { type: "button", class: "secondary", "data-edit": "", onclick: post("resume", "Resumed.") }, "Resume")
        : h("button", { type: "button", class: "secondary", "data-edit": "", onclick: post("pause", "Paused.") }, "Pause")));
  }
  return card;
}

function addFeedForm() {
  const url = h("input", { id: "feed-url", type: "url", required: true, placeholder: "the feed's http(s) URL", "data-edit": "" });
  const title = h("input", { id: "feed-title", "data-edit": "" });
  const interval = h("input", { id: "feed-interval", type: "number", min: 60, placeholder: "default", "data-edit": "" });
  const tags = h("input", { id: "feed-tags", placeholder: "comma separated", "data-edit": "" });
  const form = h("form", { id: "add-feed", onsubmit: async (ev) => {
    ev.preventDefault();
    const body = { url: url.value };
    if (title.value.trim()) body.title = title.value.trim();
    if (interval.value) body.interval_s = Number(interval.value);
    if (tags.value.trim()) body.tags = terms(tags.value);
    if (await act(form.querySelector("button"), () => api("POST", "/feeds", body), "Feed added; it is polled now.")) route();
  } },
  h("div", { class: "fields" }, h("label", { for: "feed-url" }, "URL"), url, h("label", { for: "feed-title" }, "Title"), title,
    h("label", { for: "feed-interval" }, "Interval (s)"), interval, h("label", { for: "feed-tags" }, "Tags"), tags),
  h("button", { type: "submit" }, "Add feed"));
  return h("details", { class: "card" }, h("summary", {}, "Add a feed"), form);
}

// --- delivery --------------------------------------------------------------------------------

async function pageDelivery(view, params) {
  const status = params.get("status") || "";
  const sub = params.get("subscription") || "";
  const offset = Number(params.get("offset") || 0);
  const limit = 50;
  const q = new URLSearchParams({ limit: limit + 1, offset });
  if (status) q.set("status", status);
  if (sub) q.set("subscription_id", sub);
  const [subs, deliveries] = await Promise.all([api("GET", "/subscriptions"), api("GET", "/deliveries?" + q)]);
  view.append(h("h1", {}, "Delivery"));
  view.append(h("section", { "aria-labelledby": "subs-h" }, h("h2", { id: "subs-h" }, "Subscriptions"), h("ul", { class: "grid plain", id: "subscriptions" }, subs.map(subscriptionCard))));
  const tab = (label, s) => h("a", { href: link(["delivery"], { status: s, subscription: sub }), "aria-current": s === status ? "page" : null }, label);
  view.append(h("h2", {}, "Deliveries"));
  view.append(h("nav", { class: "tabs", "aria-label": "Delivery status" }, tab("All", ""), tab("Pending", "pending"), tab("Held", "held"), tab("Delivered", "delivered"), tab("Dead letters", "dead"), tab("Suppressed", "suppressed")));
  if (sub) view.append(h("p", {}, `Subscription ${sub} · `, h("a", { href: link(["delivery"], { status }) }, "all subscriptions")));
  const more = deliveries.length > limit;
  view.append(h("ul", { class: "plain", id: "deliveries" }, deliveries.slice(0, limit).map((d) => h("li", { class: "card delivery", "data-status": d.status },
    h("a", { href: link(["delivery", d.id]) }, `${d.topic} · ${d.article_id}`), " ",
    h("span", { class: "badge " + DELIVERY_BADGE[d.status] }, d.status),
    h("div", { class: "muted" }, `to ${d.subscription_id} · created `, when(d.created_at), ` · ${d.attempts} attempt${d.attempts === 1 ? "" : "s"}`, d.next_attempt_at ? [" · next ", when(d.next_attempt_at)] : ""),
    d.last_error ? h("div", { class: "error" }, d.last_error) : null))));
  if (!deliveries.length) view.append(h("p", { class: "muted" }, "None."));
  view.append(h("p", { class: "pager" }, offset > 0 ? h("a", { href: link(["delivery"], { status, subscription: sub, offset: Math.max(0, offset - limit) }) }, "← newer") : "", " ",
    more ? h("a", { href: link(["delivery"], { status, subscription: sub, offset: offset + limit }) }, "older →") : ""));
}

// held: waiting for quiet hours or a budget; suppressed: a later article of a story already sent.
const DELIVERY_BADGE = { delivered: "ok", dead: "bad", pending: "warn", held: "warn", suppressed: "" };

function health(s) {
  if (s.disabled_reason) return h("span", { class: "badge bad" }, "disabled: " + s.disabled_reason);
  if (s.paused) return h("span", { class: "badge warn" }, "paused" + (s.paused_reason ? ": " + s.paused_reason : ""));
  if (s.failing_since) return h("span", { class: "badge bad" }, ["failing since ", when(s.failing_since)]);
  return h("span", { class: "badge ok" }, "healthy");
}

function subscriptionCard(s) {
  const card = h("li", { class: "card subscription", "data-subscription": s.id },
    h("h3", {}, s.id, " ", health(s)),
    h("p", { class: "url" }, `${s.channel}${s.url ? " → " + s.url : ""}${s.email ? " → " + s.email : ""}`),
    h("p", { class: "muted" }, `topics: ${s.topics.length ? s.topics.join(", ") : "all"} · min score ${fmt(s.min_score, 2)} · ${s.mode}`),
    h("p", {}, h("a", { href: link(["delivery"], { subscription: s.id }) }, "Deliveries"), " · ", h("a", { href: link(["delivery"], { subscription: s.id, status: "dead" }) }, "dead letters")));
  if (canEdit()) {
    const call = (path, body, done) => async (ev) => act(ev.target, () => api("POST", `/subscriptions/${encodeURIComponent(s.id)}/${path}`, body), done);
    const row = h("div", { class: "row" },
      s.paused || s.disabled_reason ? h("button", { type: "button", "data-edit": "", onclick: async (ev) => { if (await call("resume", undefined, "Resumed.")(ev)) route(); } }, "Resume")
        : h("button", { type: "button", class: "secondary", "data-edit": "", onclick: async (ev) => { if (await call("pause", undefined, "Paused.")(ev)) route(); } }, "Pause"),
      h("button", { type: "button", class: "secondary", "data-edit": "", onclick: call("test", undefined, "A test event is queued.") }, "Send test"),
      h("button", { type: "button", class: "secondary", "data-edit": "", onclick: async (ev) => {
        const since = new Date(Date.now() - 86400e3).toISOString();
        const r = await call("replay", { since }, null)(ev);
        if (r) notify(`Replaying ${r.requeued} deliveries of the last 24 hours.`, "ok");
      } }, "Replay last 24 h"));
    if (s.channel === "webhook") {
      row.append(h("button", { type: "button", class: "secondary", "data-edit": "", onclick: async (ev) => {
        const r = await call("rotate-secret", undefined, null)(ev);
        if (r) card.append(h("div", { class: "secret", role: "status" }, h("p", {}, "The new signing secret, shown this once (the old one signs too during the overlap):"), h("code", {}, r.secret)));
      } }, "Rotate secret"));
    }
    card.append(row);
  }
  return card;
}

function gap(from, to) {
  const s = (Date.parse(to) - Date.parse(from)) / 1000;
  return s < 60 ? `${s.toFixed(1)} s` : s < 3600 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

async function pageDeliveryDetail(view, id) {
  const d = await api("GET", `/deliveries/${encodeURIComponent(id)}`);
  const article = (d.payload && d.payload.data && d.payload.data.article) || {};
  view.append(h("p", { class: "crumbs" }, h("a", { href: "#/delivery" }, "Delivery"), " / ", d.id));
  view.append(h("h1", {}, article.title || d.article_id, " ", h("span", { class: "badge " + DELIVERY_BADGE[d.status], id: "delivery-status" }, d.status)));
  view.append(h("p", {}, `${d.topic} → ${d.subscription_id} · created `, when(d.created_at), d.next_attempt_at ? [" · next attempt ", when(d.next_attempt_at)] : ""));
  if (canEdit()) {
    const retry = h("button", { type: "button", id: "retry-delivery", "data-edit": "", onclick: async () => {
      if (await act(retry, () => api("POST", `/deliveries/${encodeURIComponent(d.id)}/retry`), "Queued: it is sent again now.")) setTimeout(route, 800);
    } }, d.status === "dead" ? "Replay" : "Retry now");
    view.append(h("p", {}, retry, " ", h("button", { type: "button", class: "secondary", onclick: route }, "Refresh")));
  }
  const steps = d.attempt_log.map((a, i) => h("li", { class: a.error ? "failed" : "succeeded" },
    h("strong", {}, `#${i + 1} `), when(a.attempted_at),
    i ? h("span", { class: "muted" }, ` (+${gap(d.attempt_log[i - 1].attempted_at, a.attempted_at)})`) : "",
    ` · ${a.status_code === null ? "no answer" : "HTTP " + a.status_code} · ${Math.round(a.latency_ms)} ms`,
    a.error ? h("div", { class: "error" }, a.error) : h("div", { class: "muted" }, "delivered")));
  view.append(h("section", { class: "card", "aria-labelledby": "att-h" }, h("h2", { id: "att-h" }, "Attempts"),
    steps.length ? h("ol", { class: "timeline", id: "attempts" }, steps) : h("p", { class: "muted" }, "No attempt yet.")));
  view.append(h("details", { class: "card" }, h("summary", {}, "Payload"), h("pre", {}, JSON.stringify(d.payload, null, 2))));
}

// --- routing ---------------------------------------------------------------------------------

async function route() {
  const mine = ++state.render;
  keyHandler = null;
  const { parts, params } = parseHash();
  const page = parts[0] || "topics";
  document.querySelectorAll("nav a[data-page]").forEach((a) => a.setAttribute("aria-current", a.dataset.page === page || (page === "article" && a.dataset.page === "articles") ? "page" : "false"));
  const view = h("div", { class: "page", "data-page": page });
  const s = state.session;
  const needLogin = s.mode === "keys" && !s.authenticated;
  try {
    if (page === "login" || needLogin) pageLogin(view);
    else if (page === "topics" && parts[1]) await pageTopic(view, parts[1], params);
    else if (page === "topics") await pageTopics(view);
    else if (page === "review") await pageReview(view, parts[1]);
    else if (page === "articles") await pageArticles(view, params);
    else if (page === "article") await pageArticle(view, parts[1]);
    else if (page === "matches") await pageMatches(view, params);
    else if (page === "feeds") await pageFeeds(view);
    else if (page === "delivery" && parts[1]) await pageDeliveryDetail(view, parts[1]);
    else if (page === "delivery") await pageDelivery(view, params);
    else view.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/topics" }, "Topics")));
  } catch (err) {
    if (err.status === 401 && state.session.mode === "keys") { location.hash = "#/login"; notify(err.message); return; }
    view.append(h("p", { class: "error", role: "alert" }, err.message));
    if (err.status === 404 && !(err.message || "").includes("no ")) view.append(h("p", { class: "muted" }, "This newsmon process may not run the service this page needs."));
  }
  if (mine !== state.render) return;
  main().replaceChildren(view);
  const m = main();
  if (view.afterAttach) view.afterAttach();
  else if (!m.contains(document.activeElement)) {
    const first = m.querySelector("h1");
    if (first) { first.tabIndex = -1; first.focus({ preventScroll: true }); }
  }
  document.body.dataset.ready = page; // tests wait on this
}

document.addEventListener("keydown", (ev) => {
  if (!keyHandler || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) return;
  keyHandler(ev);
});

async function boot() {
  try {
    state.session = await api("GET", "/console/session");
  } catch (err) {
    state.session = { mode: "keys", authenticated: false };
    notify(err.message);
  }
  drawWho();
  window.addEventListener("hashchange", () => { clearNotice(); route(); });
  route();
}

boot();
