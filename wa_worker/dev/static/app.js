// wa-worker dev page: index.html is a static shell; this script renders everything from
// GET /ui/state (JSON), the first paint included, then again whenever the stream GET /ui/events
// says the proxy's store changed. While that stream is down it polls every second (and every
// data-slow-poll-ms anyway: the worker's health is not in the store). The forms post JSON to /ui/*.
// Everything user-controlled goes through textContent / attributes, never innerHTML.
"use strict";

(function () {
  const POLL_MS = Number(document.body.dataset.pollMs) || 1000;
  const slowPollMs = () => Number(document.body.dataset.slowPollMs) || 15000; // read each time (tests stretch it)
  const live = document.getElementById("live");

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const pad = (n) => String(n).padStart(2, "0");

  // local date and time, "2026-11-25 17:52:19": a page left open overnight stays unambiguous
  function clock(ts) {
    if (!ts) return "";
    const d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  // a WhatsApp user JID (or bare digits) as a phone number: +55 11 98888-7777 for Brazil,
  // else +<digits>; groups, lids and anything else are shown as they are
  function phone(value) {
    const m = /^(\d{6,15})(?::\d+)?(?:@s\.whatsapp\.net)?$/.exec(String(value || ""));
    if (!m) return String(value || "");
    const d = m[1];
    const br = /^55(\d{2})(\d{4,5})(\d{4})$/.exec(d);
    return br ? "+55 " + br[1] + " " + br[2] + "-" + br[3] : "+" + d;
  }

  // the proxy lists a new instance DISCONNECTED until the worker reports it: not an error yet
  function waiting(inst) {
    return inst.status === "DISCONNECTED" && !inst.reason && inst.updated_at === inst.created_at;
  }

  let worker = null; // the worker's health as /ui/state relays it (null: the proxy runs alone)
  const simulator = () => !!(worker && worker.reachable && worker.backend === "simulator");

  function detail(inst) {
    if (inst.status === "CONNECTED" && inst.phone_number) return "+" + inst.phone_number;
    if (inst.status === "DISCONNECTED" && inst.reason === "connect_failure")
      return "reason: connect_failure (" + (inst.reason_detail || "the worker could not start a connection") +
        "; it retries with a backoff)";
    if (inst.status === "DISCONNECTED" && inst.reason)
      return "reason: " + inst.reason + (inst.reason_detail ? " (" + inst.reason_detail + ")" : "");
    if (inst.status === "CONNECTING" && inst.pair_code) return "pairing code " + inst.pair_code + ": WhatsApp \u203a Linked devices \u203a Link with phone number (or scan the QR code)";
    if (inst.status === "CONNECTING" && inst.qr_code) return "scan the QR code: WhatsApp \u203a Linked devices \u203a Link a device";
    if (inst.status === "CONNECTING") return "connecting\u2026";
    return "waiting for the worker\u2026";
  }

  // the instance's own settings and upstream proxy (issue #12; the proxy URL comes redacted)
  function ownSettings(inst) {
    const parts = [];
    // a fleet (POST /leases): which worker holds the instance, under which token
    if (inst.lease) parts.push(inst.lease.holder
      ? "lease: " + inst.lease.holder + " #" + inst.lease.token + (inst.lease.revoked ? " (revoked)" : "")
      : "lease: free (last #" + inst.lease.token + ")");
    if (inst.proxy_url) parts.push("upstream proxy " + inst.proxy_url);
    const own = inst.settings || {};
    const keys = Object.keys(own).sort();
    if (keys.length) parts.push("settings: " + keys.map((k) => k + "=" + JSON.stringify(own[k])).join(", "));
    return parts.join(" \u00b7 ");
  }

  function instanceCard(inst) {
    const card = el("article", { class: "instance", "data-instance-id": inst.id });
    const head = el("header");
    head.append(el("h3", {}, inst.id), el("span", { "data-field": "status" }));
    const img = el("img", { class: "qr", "data-field": "qr", alt: "" });
    img.hidden = true;
    const scan = el("button", { type: "button", class: "sim", "data-action": "scan" }, "Scan (simulator)");
    scan.hidden = true;
    scan.addEventListener("click", () => control(inst.id, "scan", {}, card.querySelector(".detail")));
    card.append(head, el("p", { class: "detail", "data-field": "detail" }),
      el("p", { class: "own-settings", "data-field": "settings" }), img, scan);
    return card;
  }

  function renderInstances(instances) {
    const list = document.getElementById("instance-list");
    const seen = new Set();
    for (const inst of instances) {
      seen.add(inst.id);
      let card = list.querySelector(`article[data-instance-id="${CSS.escape(inst.id)}"]`);
      if (!card) {
        card = instanceCard(inst);
        list.append(card);
      }
      const status = card.querySelector('[data-field="status"]');
      const shown = waiting(inst) ? "WAITING" : inst.status;
      status.textContent = shown;
      status.className = "status status-" + shown;
      const text = card.querySelector('[data-field="detail"]');
      if (!text.dataset.pinned) text.textContent = detail(inst);
      const own = card.querySelector('[data-field="settings"]');
      own.textContent = ownSettings(inst);
      own.hidden = !own.textContent;
      card.querySelector('button[data-action="scan"]').hidden = !(simulator() && inst.status === "CONNECTING" && inst.qr_code);
      const img = card.querySelector('[data-field="qr"]');
      if (inst.qr_code) {
        if (img.getAttribute("src") !== inst.qr_code) img.setAttribute("src", inst.qr_code);
        img.alt = "QR code to link " + inst.id;
        img.hidden = false;
      } else {
        img.hidden = true;
        img.removeAttribute("src");
        img.alt = "";
      }
    }
    for (const card of list.querySelectorAll("article[data-instance-id]")) {
      if (!seen.has(card.dataset.instanceId)) card.remove();
    }
    const empty = list.querySelector(".empty");
    if (instances.length && empty) empty.remove();
    if (!instances.length && !empty)
      list.append(el("p", { class: "empty" }, "No instances yet: add one below (or `wa-worker dev instance add NAME`)."));

    const ids = instances.map((i) => i.id);
    for (const select of document.querySelectorAll('select[name="instanceId"]')) {
      const current = select.value;
      const have = Array.from(select.options).map((o) => o.value);
      if (ids.join("\n") !== have.join("\n")) {
        select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
        if (ids.includes(current)) select.value = current;
      }
    }
  }

  // the worker's health, next to the page's own "live" badge
  function renderWorker() {
    const badge = document.getElementById("worker");
    let text, cls;
    if (worker === null) {
      text = "no worker (proxy only)";
      cls = "idle";
    } else if (!worker.reachable) {
      text = "worker not reachable";
      cls = "down";
    } else {
      const n = worker.instances || {};
      text = "worker " + (worker.status || "?") + " \u00b7 " + (worker.backend || "?") + " \u00b7 " +
        (n.connected || 0) + "/" + (n.total || 0) + " connected \u00b7 up " + Math.round(worker.uptime_s || 0) + " s";
      cls = worker.status === "ok" ? "ok" : "down";
    }
    badge.textContent = text;
    badge.className = "live " + cls;
    document.getElementById("simulate-form").hidden = !simulator();
  }

  function emptyRow(body, columns, text) {
    const td = el("td", { colspan: String(columns) }, text);
    const tr = el("tr", { class: "empty" });
    tr.append(td);
    body.replaceChildren(tr);
  }

  // ------------------------------------------------------------------ message content (issue #11)

  const MEDIA_PATH = /\/media\/([0-9a-f]{64})$/;
  let known = new Map(); // wa_message_id -> short text, for quoted snippets

  function snippet(id) {
    const text = known.get(id);
    return text ? "\u201c" + (text.length > 60 ? text.slice(0, 60) + "\u2026" : text) + "\u201d" : id;
  }

  // a media URL this page may embed: only files of this proxy (same origin, CSP 'self')
  function localSrc(url) {
    if (!url) return null;
    const m = MEDIA_PATH.exec(String(url).split("?")[0]);
    return m ? "/media/" + m[1] : null;
  }

  function mediaNode(kind, src, remote, filename, mimetype) {
    if (src) {
      if (kind === "image" || kind === "sticker") return el("img", { class: "media", src: src, alt: filename || kind });
      if (kind === "audio" || kind === "voice") return el("audio", { class: "media", src: src, controls: "", preload: "metadata" });
      if (kind === "video") return el("video", { class: "media", src: src, controls: "", preload: "metadata" });
      return el("a", { class: "doc", href: src, download: filename || "" }, "\u{1F4C4} " + (filename || mimetype || "document"));
    }
    if (remote) return el("a", { class: "doc", href: remote, target: "_blank", rel: "noopener noreferrer" }, "\u{1F517} " + (filename || kind + " (remote)"));
    return null;
  }

  function contentNode(m, inbound) {
    const box = el("div", { class: "msg" });
    // a media message queued without a type: its kind is known only once the worker has the bytes
    const kind = m.type || (m.media_url || m.media_sha256 || (m.media && m.media.mimetype) ? "document" : "text");
    const target = m.target_id || (m.reaction && m.reaction.target_id) || m.reply_to;
    const quoted = inbound ? m.quoted_id : kind !== "reaction" && m.reply_to;
    if (quoted) box.append(el("div", { class: "quote" }, "\u21aa " + snippet(quoted)));
    if (kind !== "text") box.append(el("span", { class: "kind kind-" + kind }, kind));
    if (m.view_once) box.append(el("span", { class: "kind" }, "view once"));
    if (kind === "reaction") {
      const emoji = inbound ? (m.reaction && m.reaction.emoji) : m.reaction;
      box.append(el("span", { class: "reaction" }, emoji ? emoji + " on " + snippet(target) : "reaction removed from " + snippet(target)));
    } else if (kind === "edit") {
      box.append(el("span", { class: "note" }, "edited " + snippet(target) + ": "));
    } else if (kind === "revoke") {
      box.append(el("span", { class: "note" }, "deleted " + snippet(target)));
    } else if (kind === "call" && m.call) {
      box.append(el("span", { class: "note", "data-field": "call" },
        (m.call.video ? "\u{1F4F9} video call" : "\u{1F4DE} voice call") + (m.call.rejected ? ", rejected" : "")));
    } else if (kind === "undecryptable") {
      box.append(el("span", { class: "note" }, "waiting for this message (could not be decrypted)"));
    }
    let media = null;
    if (inbound && m.media) {
      media = mediaNode(kind, localSrc(m.media.url), m.media.url && !localSrc(m.media.url) ? m.media.url : null, m.media.filename, m.media.mimetype);
    } else if (!inbound && (m.media_sha256 || m.media_url)) {
      media = mediaNode(kind, m.media_sha256 ? "/media/" + m.media_sha256 : localSrc(m.media_url), m.media_sha256 ? null : m.media_url, m.filename, m.mimetype);
    }
    if (media) box.append(media);
    if (inbound && m.media_error) box.append(el("span", { class: "media-error" }, "media not kept: " + m.media_error));
    if (m.latitude !== null && m.latitude !== undefined && m.longitude !== null && m.longitude !== undefined) {
      const map = "https://www.openstreetmap.org/?mlat=" + encodeURIComponent(m.latitude) + "&mlon=" + encodeURIComponent(m.longitude) + "#map=17/" + m.latitude + "/" + m.longitude;
      const label = "\u{1F4CD} " + [m.name, m.address].filter(Boolean).join(", ") + " (" + m.latitude + ", " + m.longitude + ")";
      box.append(el("a", { class: "location", href: map, target: "_blank", rel: "noopener noreferrer" }, label));
    }
    if (m.contact || m.vcard) {
      const c = m.contact || {};
      const fn = !c.name && m.vcard ? (/^FN[^:\r\n]*:(.*)$/m.exec(m.vcard) || [])[1] : c.name;
      box.append(el("span", { class: "contact" }, "\u{1F464} " + [fn, c.phone].filter(Boolean).join(" ")));
    }
    if (m.body) box.append(el("span", { class: "text" }, m.body));
    return box;
  }

  function renderOutbound(rows) {
    const body = document.getElementById("outbound-rows");
    if (!rows.length) return emptyRow(body, 6, "Nothing sent yet: queue a message above (or `wa-worker dev send`).");
    body.replaceChildren(
      ...rows.map((m) => {
        const tr = el("tr", { "data-message-id": m.id, "data-type": m.type || "text" });
        const st = el("span", { class: "mstatus mstatus-" + m.status }, m.status);
        const stCell = el("td");
        stCell.append(st);
        if (m.receipt) stCell.append(el("span", { class: "receipt", "data-field": "receipt" }, " \u2713 " + m.receipt.status));
        const msgCell = el("td", { class: "body" });
        msgCell.append(contentNode(m, false));
        const note = m.status === "failed"
          ? (m.error_code ? "[" + m.error_code + "] " : "") + (m.error || "")
          : m.wa_message_id || "";
        tr.append(
          el("td", {}, clock(m.created_at)),
          el("td", {}, m.instanceId),
          el("td", {}, m.to),
          msgCell,
          stCell,
          el("td", { class: "note", "data-field": "note" }, note)
        );
        return tr;
      })
    );
  }

  function renderInbound(rows) {
    const body = document.getElementById("inbound-rows");
    if (!rows.length) {
      return emptyRow(body, 5, simulator()
        ? "Nothing received yet: use \u201cSimulate incoming\u201d above (or `wa-worker dev inbound`)."
        : "Nothing received yet: messages to the linked numbers show up here.");
    }
    body.replaceChildren(
      ...rows.map((m) => {
        const tr = el("tr", { "data-wa-message-id": m.wa_message_id, "data-type": m.type || "text" });
        const who = phone(m.from) + (m.push_name ? " (" + m.push_name + ")" : "");
        const msgCell = el("td", { class: "body" });
        msgCell.append(contentNode(m, true));
        tr.append(
          el("td", {}, clock(m.received_at)),
          el("td", {}, m.instanceId),
          el("td", { title: m.from }, who),
          msgCell,
          el("td", { class: "note" }, m.wa_message_id)
        );
        return tr;
      })
    );
  }

  let lastRefresh = 0;
  let refreshing = null; // the refresh in flight
  let again = false; // a change arrived during it: refresh once more after
  let streamOpen = false;

  async function refresh() {
    lastRefresh = Date.now();
    try {
      const resp = await fetch("/ui/state", { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const state = await resp.json();
      worker = state.worker === undefined ? null : state.worker;
      renderWorker();
      renderInstances(state.instances);
      known = new Map();
      for (const m of state.inbound) if (m.body) known.set(m.wa_message_id, m.body);
      for (const m of state.outbound) if (m.body && m.wa_message_id) known.set(m.wa_message_id, m.body);
      renderOutbound(state.outbound);
      renderInbound(state.inbound);
      live.textContent = "live";
      live.className = "live ok";
      document.body.dataset.refreshed = String((Number(document.body.dataset.refreshed) || 0) + 1);
    } catch (err) {
      lastRefresh = 0; // retry at the next tick
      live.textContent = "proxy unreachable";
      live.className = "live down";
    }
  }

  async function post(url, payload) {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-WA-Dev": "1" },
      body: JSON.stringify(payload),
    });
    let data = {};
    try {
      data = await resp.json();
    } catch (err) {
      /* empty or non-JSON body */
    }
    if (!resp.ok) throw new Error(data.error || "HTTP " + resp.status);
    return data;
  }

  // a simulator control (Scan, Simulate incoming); its outcome in `where` for a few seconds
  async function control(instanceId, action, payload, where) {
    where.dataset.pinned = "1";
    where.className = "detail";
    where.textContent = "\u2026";
    try {
      await post("/ui/simulator/" + encodeURIComponent(instanceId) + "/" + action, payload);
      where.textContent = action === "scan" ? "scanned: connecting\u2026" : "received";
    } catch (err) {
      where.className = "detail error";
      where.textContent = err.message;
    }
    setTimeout(() => { delete where.dataset.pinned; where.className = "detail"; }, 3000);
    refresh();
  }

  function wire(formId, build, onDone) {
    const form = document.getElementById(formId);
    const result = form.querySelector('[data-field="result"]');
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const fields = Object.fromEntries(new FormData(form).entries());
      result.className = "result";
      result.textContent = "\u2026";
      try {
        const [url, payload] = await build(fields);
        const data = await post(url, payload);
        result.textContent = onDone(data, form);
      } catch (err) {
        result.className = "result error";
        result.textContent = err.message;
      }
      refresh();
    });
  }

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("cannot read " + file.name));
      reader.readAsDataURL(file);
    });
  }

  const MEDIA_TYPES = ["image", "video", "audio", "voice", "document", "sticker"];

  // the queued message, as docs/proxy-contract.md ("Message types") describes it
  async function queuePayload(f) {
    const type = f.type || "text";
    const msg = { instanceId: f.instanceId, to: f.to, body: f.body || "" };
    if (type !== "text") msg.type = type;
    if (f.reply_to) msg.reply_to = f.reply_to.trim();
    if (MEDIA_TYPES.includes(type)) {
      if (f.media_url) msg.media_url = f.media_url.trim();
      else if (f.media && f.media.size) {
        msg.media_base64 = await readDataUrl(f.media); // a data: URL; the proxy decodes it
        msg.filename = f.media.name;
        if (f.media.type) msg.mimetype = f.media.type;
      }
    } else if (type === "location") {
      msg.latitude = Number(f.latitude);
      msg.longitude = Number(f.longitude);
      if (f.loc_name) msg.name = f.loc_name;
      if (f.loc_address) msg.address = f.loc_address;
    } else if (type === "contact") {
      msg.contact = { name: f.contact_name, phone: f.contact_phone };
    } else if (type === "reaction") {
      msg.reaction = f.reaction || "";
    }
    return ["/ui/queue", msg];
  }

  // show only the fields of the chosen type
  const queueForm = document.getElementById("queue-form");
  function showFieldsFor() {
    const type = queueForm.elements.type.value;
    const group = MEDIA_TYPES.includes(type) ? "media" : type;
    for (const fs of queueForm.querySelectorAll("fieldset[data-for]")) fs.hidden = !fs.dataset.for.split(" ").includes(group);
  }
  queueForm.elements.type.addEventListener("change", showFieldsFor);
  showFieldsFor();

  wire(
    "queue-form",
    queuePayload,
    (data, form) => {
      for (const name of ["body", "media", "media_url", "reply_to", "reaction"]) form.elements[name].value = "";
      return "queued " + data.message.id;
    }
  );
  wire(
    "instance-form",
    async (f) => ["/ui/instances", { id: f.id }],
    (data, form) => {
      form.elements.id.value = "";
      return "added " + data.instance.id;
    }
  );

  wire(
    "simulate-form",
    async (f) => ["/ui/simulator/" + encodeURIComponent(f.instanceId) + "/inbound", { from: f.from, body: f.body }],
    (data, form) => {
      form.elements.body.value = "";
      return "received " + (data.wa_message_id || "");
    }
  );

  // one refresh at a time; changes arriving meanwhile cost one more, not one each
  function refreshSoon(reason) {
    if (refreshing) {
      again = true;
      return;
    }
    document.body.dataset.refreshedBy = reason;
    refreshing = refresh().finally(() => {
      refreshing = null;
      if (again) {
        again = false;
        refreshSoon(reason);
      }
    });
  }

  function listen() {
    if (!window.EventSource) return; // polling only
    const source = new EventSource("/ui/events");
    source.addEventListener("open", () => { streamOpen = true; document.body.dataset.stream = "open"; });
    source.addEventListener("changed", () => refreshSoon("event"));
    source.addEventListener("error", () => { streamOpen = false; document.body.dataset.stream = "down"; });
  }

  function tick() {
    const due = streamOpen ? slowPollMs() : POLL_MS;
    if (Date.now() - lastRefresh >= due) refreshSoon("poll");
    setTimeout(tick, Math.min(POLL_MS, due));
  }

  refreshSoon("load");
  listen();
  setTimeout(tick, POLL_MS);
})();
