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

  function renderOutbound(rows) {
    const body = document.getElementById("outbound-rows");
    body.replaceChildren(
      ...rows.map((m) => {
        const tr = el("tr", { "data-message-id": m.id });
        const st = el("span", { class: "mstatus mstatus-" + m.status }, m.status);
        const stCell = el("td");
        stCell.append(st);
        tr.append(
          el("td", {}, clock(m.created_at)),
          el("td", {}, m.instanceId),
          el("td", {}, m.to),
          el("td", { class: "body" }, m.body),
          stCell,
          el("td", { class: "note" }, m.error || m.wa_message_id || "")
        );
        return tr;
      })
    );
  }

  function renderInbound(rows) {
    const body = document.getElementById("inbound-rows");
    body.replaceChildren(
      ...rows.map((m) => {
        const tr = el("tr", { "data-wa-message-id": m.wa_message_id });
        const who = m.from + (m.push_name ? " (" + m.push_name + ")" : "");
        tr.append(
          el("td", {}, clock(m.received_at)),
          el("td", {}, m.instanceId),
          el("td", {}, who),
          el("td", { class: "body" }, m.body)
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
      const [url, payload] = build(fields);
      result.className = "result";
      result.textContent = "\u2026";
      try {
        const data = await post(url, payload);
        result.textContent = onDone(data, form);
      } catch (err) {
        result.className = "result error";
        result.textContent = err.message;
      }
      refresh();
    });
  }

  wire(
    "queue-form",
    (f) => ["/ui/queue", { instanceId: f.instanceId, to: f.to, body: f.body }],
    (data, form) => {
      form.elements.body.value = "";
      return "queued " + data.message.id;
    }
  );
  wire(
    "instance-form",
    (f) => ["/ui/instances", { id: f.id }],
    (data, form) => {
      form.elements.id.value = "";
      return "added " + data.instance.id;
    }
  );

  refresh();
  setInterval(refresh, POLL_MS);
})();
