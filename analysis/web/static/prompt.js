// The live prompt: as you type (debounced), the prompt's tokens stream in over SSE, shaded
// by one feature (mode "feature") or by each token's strongest feature (mode "top");
// clicking a token lists its features, each a link to its feature page.
"use strict";
(function () {
  const S = window.saereg;
  const page = document.getElementById("prompt-page");
  if (!page) return;
  const ref = page.dataset.ref;
  const box = document.getElementById("tokens");
  const prompt = document.getElementById("prompt");
  const mode = document.getElementById("mode");
  const feature = document.getElementById("feature");
  const status = document.getElementById("prompt-status");
  const list = document.getElementById("token-features");
  const chosenLine = document.getElementById("token-chosen");
  const TOP = 8;
  let controller = null;
  let tokens = [];
  let spans = [];

  function value(t) {
    if (mode.value === "feature") return t.act || 0;
    return t.features && t.features.length ? t.features[0][1] : 0;
  }

  function reshade() {
    let scale = 0;
    tokens.forEach((t) => { if (!t.special) scale = Math.max(scale, value(t)); });
    spans.forEach((span, i) => { span.style.backgroundColor = S.shade(value(tokens[i]), scale); });
  }

  function describe(t) {
    const feats = (t.features || []).map((f) => "#" + f[0] + " " + Number(f[1]).toFixed(3)
                                              + (f[2] ? " " + f[2] : ""));
    const head = mode.value === "feature" ? "feature " + feature.value + ": "
                                            + Number(t.act || 0).toFixed(4) : "";
    return [head, ...feats].filter(Boolean).join("\n");
  }

  function choose(i) {
    spans.forEach((s, j) => s.classList.toggle("chosen", i === j));
    const t = tokens[i];
    chosenLine.textContent = "token " + t.position + ": " + JSON.stringify(t.token);
    list.replaceChildren(...(t.features || []).map((f) => {
      const li = S.el("li");
      li.append(S.el("a", {href: "/sae/" + ref + "/feature/" + f[0]}, "#" + f[0]),
                " " + Number(f[1]).toFixed(3) + (f[2] ? "  " + f[2] : ""));
      return li;
    }));
    if (!list.children.length) list.append(S.el("li", {"class": "muted"}, "no feature fires here"));
  }

  function add(t) {
    const v = mode.value === "feature" ? (t.act || 0) : value(t);
    const span = S.el("span", {"class": "tok" + (t.special ? " special" : ""),
                               "data-act": v, "data-position": t.position}, t.token);
    span.title = describe(t);
    const i = tokens.length;
    span.addEventListener("click", () => choose(i));
    tokens.push(t);
    spans.push(span);
    box.append(span);
    reshade();
  }

  async function run() {
    if (controller) controller.abort();
    const text = prompt.value;
    if (!text.trim()) {
      box.replaceChildren();
      tokens = []; spans = [];
      status.textContent = "";
      return;
    }
    let index = null;
    if (mode.value === "feature") {
      if (feature.value === "") { status.textContent = "enter a feature index"; return; }
      index = parseInt(feature.value, 10);
    }
    controller = new AbortController();
    const mine = controller;
    let fresh = true;
    status.textContent = "…";
    try {
      await S.stream("/api/sae/" + encodeURIComponent(ref) + "/prompt",
                     {text: text, feature: index, top: TOP}, (name, data) => {
        if (mine !== controller) return;
        if (fresh) { box.replaceChildren(); tokens = []; spans = []; list.replaceChildren(); fresh = false; }
        if (name === "message") add(data);
        else if (name === "done") status.textContent = data.tokens + " tokens";
        else if (name === "error") S.showError(data.detail);
      }, mine.signal);
      if (mine === controller) S.showError("");
    } catch (e) {
      if (e.name !== "AbortError") { S.showError(e.message); status.textContent = ""; }
    }
  }

  const later = S.debounce(run, 250);
  prompt.addEventListener("input", later);
  feature.addEventListener("input", later);
  mode.addEventListener("change", run);
  if (prompt.value.trim()) run();
})();
