// saereg serve: helpers every page uses. Text from the catalog is only ever set through
// textContent (never parsed as HTML).
"use strict";
(function () {
  const KEY = "saereg-token";
  // The URL `saereg serve` prints carries ?token=T once: keep it, then drop it from the URL.
  const here = new URL(window.location.href);
  if (here.searchParams.has("token")) {
    localStorage.setItem(KEY, here.searchParams.get("token"));
    here.searchParams.delete("token");
    history.replaceState(null, "", here.pathname + here.search + here.hash);
  }

  function headers() {
    const h = {"Content-Type": "application/json", "Accept": "application/json"};
    const token = localStorage.getItem(KEY);
    if (token) h["Authorization"] = "Bearer " + token;
    return h;
  }

  async function failure(response) {
    let detail = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") detail = body.detail;
    } catch (e) { /* not JSON */ }
    const err = new Error(detail);
    err.status = response.status;
    return err;
  }

  async function getJSON(path) {
    const r = await fetch(path, {headers: {"Accept": "application/json"}});
    if (!r.ok) throw await failure(r);
    return r.json();
  }

  async function postJSON(path, body) {
    const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) throw await failure(r);
    return r.json();
  }

  // POST `body` and read the Server-Sent Events of the answer as they arrive:
  // onEvent(name, data) per event. XMLHttpRequest rather than fetch: its progress events
  // hand over the text as it streams in, and the browser reports the request as finished.
  function stream(path, body, onEvent, signal) {
    return new Promise((resolve, reject) => {
      const x = new XMLHttpRequest();
      let seen = 0;
      const parse = (final) => {
        if (x.status < 200 || x.status >= 300) return;
        const text = x.responseText;
        let cut;
        while ((cut = text.indexOf("\n\n", seen)) >= 0 || (final && seen < text.length)) {
          const end = cut >= 0 ? cut : text.length;
          const block = text.slice(seen, end);
          seen = end + 2;
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
          }
          if (data.length) onEvent(name, JSON.parse(data.join("\n")));
          if (cut < 0) break;
        }
      };
      x.open("POST", path);
      for (const [k, v] of Object.entries(headers())) x.setRequestHeader(k, v);
      x.onprogress = () => parse(false);
      x.onload = () => {
        if (x.status >= 200 && x.status < 300) {
          parse(true);
          resolve();
          return;
        }
        let detail = x.status + " " + x.statusText;
        try {
          const answer = JSON.parse(x.responseText);
          if (answer && typeof answer.detail === "string") detail = answer.detail;
        } catch (e) { /* not JSON */ }
        const err = new Error(detail);
        err.status = x.status;
        reject(err);
      };
      x.onerror = () => reject(new Error("the server did not answer"));
      x.onabort = () => {
        const err = new Error("aborted");
        err.name = "AbortError";
        reject(err);
      };
      if (signal) {
        if (signal.aborted) { x.abort(); return; }
        signal.addEventListener("abort", () => x.abort());
      }
      x.send(JSON.stringify(body));
    });
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : String(v));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function shade(act, scale) {
    if (!(act > 0) || !(scale > 0)) return "";
    const alpha = 0.12 + 0.78 * Math.min(1, act / scale);
    return "rgba(255, 110, 0, " + alpha.toFixed(3) + ")";
  }

  function showError(message) {
    const box = document.getElementById("error");
    if (!box) return;
    box.textContent = message || "";
    box.hidden = !message;
  }

  function debounce(fn, ms) {
    let timer = null;
    return function () {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "-";
    return Number(x).toPrecision(digits || 3);
  }

  window.saereg = {getJSON, postJSON, stream, el, shade, showError, debounce, fmt};
})();
