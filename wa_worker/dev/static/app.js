// wa-worker dev page: index.html is a static shell; this script renders everything from
// GET /ui/state (JSON), the first paint included, then every second. The forms post JSON to /ui/*.
// Everything user-controlled goes through textContent / attributes, never innerHTML.
"use strict";

(function () {
  const POLL_MS = Number(document.body.dataset.pollMs) || 1000;
  const live = document.getElementById("live");

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clock(ts) {
    if (!ts) return "";
    return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
  }

  function detail(inst) {
    if (inst.status === "CONNECTED" && inst.phone_number) return "+" + inst.phone_number;
    if (inst.status === "DISCONNECTED" && inst.reason) return "reason: " + inst.reason;
    if (inst.status === "CONNECTING" && inst.pair_code) return "pairing code " + inst.pair_code + ": WhatsApp \u203a Linked devices \u203a Link with phone number (or scan the QR code)";
    if (inst.status === "CONNECTING" && inst.qr_code) return "scan the QR code: WhatsApp \u203a Linked devices \u203a Link a device";
    if (inst.status === "CONNECTING") return "connecting\u2026";
    return "waiting for the worker\u2026";
  }

  function instanceCard(inst) {
    const card = el("article", { class: "instance", "data-instance-id": inst.id });
    const head = el("header");
    head.append(el("h3", {}, inst.id), el("span", { "data-field": "status" }));
    const img = el("img", { class: "qr", "data-field": "qr", alt: "" });
    img.hidden = true;
    card.append(head, el("p", { class: "detail", "data-field": "detail" }), img);
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
      status.textContent = inst.status;
      status.className = "status status-" + inst.status;
      card.querySelector('[data-field="detail"]').textContent = detail(inst);
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
    if (!instances.length && !empty) list.append(el("p", { class: "empty" }, "No instances yet."));

    const select = document.querySelector('#queue-form select[name="instanceId"]');
    const current = select.value;
    const ids = instances.map((i) => i.id);
    const have = Array.from(select.options).map((o) => o.value);
    if (ids.join("\n") !== have.join("\n")) {
      select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
      if (ids.includes(current)) select.value = current;
    }
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
    body.replaceChildren(
      ...rows.map((m) => {
        const tr = el("tr", { "data-wa-message-id": m.wa_message_id, "data-type": m.type || "text" });
        const who = m.from + (m.push_name ? " (" + m.push_name + ")" : "");
        const msgCell = el("td", { class: "body" });
        msgCell.append(contentNode(m, true));
        tr.append(
          el("td", {}, clock(m.received_at)),
          el("td", {}, m.instanceId),
          el("td", {}, who),
          msgCell,
          el("td", { class: "note" }, m.wa_message_id)
        );
        return tr;
      })
    );
  }

  async function refresh() {
    try {
      const resp = await fetch("/ui/state", { cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const state = await resp.json();
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

  refresh();
  setInterval(refresh, POLL_MS);
})();
