// tokenwire's chat page: plain JavaScript over the bridge's public API
// (/v1/models, /v1/chat/completions streamed, /v1/embeddings, /v1/status).
// Everything the server or the model says reaches the DOM as text nodes
// (textContent, new Option), never as markup.
"use strict";

(() => {
  const KEY_STORAGE = "tokenwire.apiKey";
  const MODEL_STORAGE = "tokenwire.model";
  const CLUSTER_REFRESH_MS = 3000;
  const STATUS_TEXT = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 413: "Request too large",
    429: "Too many requests", 499: "Cancelled", 500: "Server error", 502: "Bad gateway",
    503: "Service unavailable", 504: "Timed out",
  };
  const $ = (id) => document.getElementById(id);

  const state = { history: [], controller: null, clusterTimer: null };

  // -- talking to the bridge ---------------------------------------------------

  const apiKey = () => localStorage.getItem(KEY_STORAGE) || "";

  function requestHeaders(withBody) {
    const headers = {};
    if (withBody) headers["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  // One readable line from an OpenAI error envelope: status, code, message, Retry-After.
  function describeError(status, envelope, retryAfter) {
    const error = envelope && typeof envelope === "object" && envelope.error ? envelope.error : {};
    const parts = [];
    if (status) parts.push(`${status} ${STATUS_TEXT[status] || "Error"}`);
    if (error.code || error.type) parts.push(error.code || error.type);
    const message = error.message || (typeof envelope === "string" ? envelope.trim() : "");
    let line = parts.join(" · ");
    if (message) line += (line ? ": " : "") + message;
    if (retryAfter) line += ` Retry after ${retryAfter} s.`;
    return line || "The request failed.";
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorFrom(response) {
    const text = await response.text();
    let body = text.slice(0, 500);
    try {
      body = JSON.parse(text);
    } catch (_) {
      // not JSON (a proxy's page): show its start
    }
    return new ApiError(response.status, describeError(response.status, body, response.headers.get("Retry-After")));
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: requestHeaders(options.body !== undefined) });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `Cannot reach the server: ${error.message}`);
    }
    if (!response.ok) {
      const error = await errorFrom(response);
      if (error.status === 401) askForKey(error.message);
      throw error;
    }
    return response;
  }

  // The data of each server-sent event of a streamed body, as it arrives.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (data) yield data;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // -- notices and the key dialog -------------------------------------------------

  function showNotice(text) {
    $("notice").textContent = text;
    $("notice").hidden = false;
  }

  function clearNotice() {
    $("notice").hidden = true;
    $("notice").textContent = "";
  }

  // refused: the server answered 401 (with this reason); otherwise the user asked.
  function askForKey(reason, refused = true) {
    const message = $("key-message");
    message.classList.toggle("error", refused && Boolean(apiKey()));
    if (!refused) message.textContent = "The API key for this server (empty for none).";
    else if (apiKey()) message.textContent = `The server refused this key.\n${reason}`;
    else message.textContent = `This server needs an API key.\n${reason}`;
    if ($("key-dialog").hidden) {
      $("key-dialog").hidden = false;
      $("key-input").value = "";
      $("key-input").focus();
    }
  }

  async function saveKey(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-dialog").hidden = true;
    await loadModels();
  }

  // -- models -----------------------------------------------------------------------

  function fillSelect(select, models, preferred) {
    const wanted = preferred || select.value;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === wanted)) select.value = wanted;
  }

  async function loadModels() {
    try {
      const { data } = await (await api("/v1/models")).json();
      fillSelect($("model"), data.filter((m) => m.kind !== "embedding"), localStorage.getItem(MODEL_STORAGE));
      fillSelect($("embed-model"), data.filter((m) => m.kind === "embedding"));
      clearNotice();
      if (!data.length) showNotice("No model is being served right now.");
    } catch (error) {
      if (error.status !== 401) showNotice(`Could not list the models. ${error.message}`);
    }
  }

  // -- the conversation --------------------------------------------------------------

  // Text with ``` fences: code in <pre>, the rest as text; all of it text nodes.
  function renderText(container, text) {
    const nodes = text.split("```").map((segment, i) => {
      if (i % 2 === 0) return document.createTextNode(segment);
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = segment.replace(/^[\w+-]*\n/, "");
      pre.append(code);
      return pre;
    });
    container.replaceChildren(...nodes);
  }

  function addMessage(role, text) {
    const box = document.createElement("div");
    box.className = `message ${role}`;
    const content = document.createElement("div");
    content.className = "content";
    renderText(content, text);
    box.append(content);
    $("messages").append(box);
    box.scrollIntoView({ block: "end" });
    return {
      box,
      setText(value) {
        renderText(content, value);
        box.scrollIntoView({ block: "end" });
      },
      setError(value) {
        const error = document.createElement("div");
        error.className = "error";
        error.textContent = value;
        box.append(error);
      },
      setMeta(fields, copyText) {
        const meta = document.createElement("div");
        meta.className = "meta";
        for (const field of fields) {
          const span = document.createElement("span");
          span.textContent = field;
          meta.append(span);
        }
        if (copyText) {
          const copy = document.createElement("button");
          copy.type = "button";
          copy.className = "quiet copy";
          copy.textContent = "Copy";
          copy.addEventListener("click", () => copyToClipboard(copyText, copy));
          meta.append(copy);
        }
        box.append(meta);
      },
    };
  }

  async function copyToClipboard(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
  }

  function chatBody(model) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  async function send() {
    const text = $("prompt").value.trim();
    const model = $("model").value;
    if (!text || state.controller) return;
    if (!model) {
      showNotice("No chat model to talk to: none is being served, or the API key is missing.");
      return;
    }
    $("prompt").value = "";
    addMessage("user", text);
    // This conversation's history: "New chat" mid-answer starts another one.
    const history = state.history;
    history.push({ role: "user", content: text });
    const view = addMessage("assistant", "");
    view.box.dataset.state = "streaming";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    const started = performance.now();
    let firstAt = null;
    let pieces = 0;
    let usage = null;
    let answer = "";
    let servedBy = model;
    let failure = null;
    let stopped = false;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        body: JSON.stringify(chatBody(model)),
        signal: controller.signal,
      });
      for await (const data of sseEvents(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = `The answer broke off: ${describeError(null, chunk)}`;
          break;
        }
        if (chunk.model) servedBy = chunk.model;
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (!piece) continue;
          if (firstAt === null) firstAt = performance.now();
          answer += piece;
          pieces += 1;
          view.setText(answer);
        }
      }
    } catch (error) {
      if (error.name === "AbortError") stopped = true;
      else failure = error.message;
    }
    const ended = performance.now();
    state.controller = null;
    setBusy(false);

    if (answer) history.push({ role: "assistant", content: answer });
    else if (failure) {
      // Nothing came back: take the question out of the history and give it back.
      history.pop();
      if (!$("prompt").value) $("prompt").value = text;
    }
    if (failure) view.setError(failure);
    const tokens = usage ? usage.completion_tokens : pieces;
    const fields = answer || !failure ? [servedBy, `${tokens} tokens`] : [servedBy];
    if (firstAt !== null) {
      fields.push(`TTFT ${Math.round(firstAt - started)} ms`);
      const seconds = (ended - firstAt) / 1000;
      if (tokens > 1 && seconds > 0) fields.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
    if (stopped) fields.push("stopped");
    view.setMeta(fields, answer);
    if (usage) view.box.dataset.promptTokens = String(usage.prompt_tokens);
    view.box.dataset.state = failure ? "error" : stopped ? "stopped" : "done";
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren();
    $("prompt").focus();
  }

  // -- embeddings ----------------------------------------------------------------------

  function cosine(a, b) {
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < a.length; i += 1) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
  }

  async function compare() {
    const result = $("similarity");
    result.classList.remove("error");
    delete result.dataset.value;
    const model = $("embed-model").value;
    if (!model) {
      result.classList.add("error");
      result.textContent = "No embedding model is being served.";
      return;
    }
    result.textContent = "Embedding…";
    try {
      const input = [$("text-a").value, $("text-b").value];
      const response = await api("/v1/embeddings", { method: "POST", body: JSON.stringify({ model, input }) });
      const { data } = await response.json();
      const value = cosine(data[0].embedding, data[1].embedding);
      result.dataset.value = String(value);
      result.textContent = `Cosine similarity: ${value.toFixed(4)} (${data[0].embedding.length} dimensions)`;
    } catch (error) {
      result.classList.add("error");
      result.textContent = error.message;
    }
  }

  // -- the cluster view -------------------------------------------------------------------

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.append(td);
  }

  function renderCluster(status) {
    const rows = [];
    for (const model of status.models) {
      const workers = model.workers.length ? model.workers : [null];
      workers.forEach((worker, i) => {
        const row = document.createElement("tr");
        row.dataset.model = model.id;
        cell(row, model.id);
        cell(row, model.kind);
        if (worker === null) {
          cell(row, "no live worker", "health-bad");
          for (let k = 0; k < 4; k += 1) cell(row, "");
        } else {
          row.classList.add("worker");
          cell(row, `#${i + 1}`);
          cell(row, `${worker.in_flight}/${worker.capacity}`);
          cell(row, String(worker.queue_length));
          cell(row, `${worker.heartbeat_age_seconds.toFixed(1)} s ago`);
          cell(row, worker.health, worker.health === "SERVING" ? "health-SERVING" : "health-bad");
        }
        rows.push(row);
      });
    }
    $("cluster").tBodies[0].replaceChildren(...rows);
  }

  function renderBatches(page) {
    const rows = page.data.map((batch) => {
      const row = document.createElement("tr");
      row.dataset.batch = batch.id;
      const counts = batch.request_counts;
      cell(row, batch.id);
      cell(row, batch.endpoint);
      cell(row, batch.status, batch.status === "failed" ? "health-bad" : "");
      cell(row, `${counts.completed}/${counts.total}`);
      cell(row, String(counts.failed));
      const bar = document.createElement("progress");
      bar.max = Math.max(counts.total, 1);
      bar.value = counts.completed + counts.failed;
      const td = document.createElement("td");
      td.append(bar);
      row.append(td);
      return row;
    });
    $("batches").tBodies[0].replaceChildren(...rows);
  }

  async function refreshCluster() {
    const updated = $("cluster-updated");
    try {
      renderCluster(await (await api("/v1/status")).json());
      renderBatches(await (await api("/v1/batches?limit=20")).json());
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
      updated.classList.remove("error");
    } catch (error) {
      updated.textContent = error.message;
      updated.classList.add("error");
    }
  }

  // -- tabs and wiring -------------------------------------------------------------------------

  function showTab(tab) {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      $(other.dataset.panel).hidden = !selected;
    }
    clearInterval(state.clusterTimer);
    state.clusterTimer = null;
    if (tab.id === "tab-cluster") {
      refreshCluster();
      state.clusterTimer = setInterval(refreshCluster, CLUSTER_REFRESH_MS);
    }
  }

  function wire() {
    for (const tab of document.querySelectorAll('[role="tab"]')) tab.addEventListener("click", () => showTab(tab));
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      }
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("new-chat").addEventListener("click", newChat);
    $("model").addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, $("model").value));
    $("embed-go").addEventListener("click", compare);
    $("key-button").addEventListener("click", () => askForKey("", false));
    $("key-form").addEventListener("submit", saveKey);
    $("key-cancel").addEventListener("click", () => ($("key-dialog").hidden = true));
    if (window.matchMedia("(max-width: 600px)").matches) $("settings").open = false;
    loadModels();
  }

  document.addEventListener("DOMContentLoaded", wire);
})();
