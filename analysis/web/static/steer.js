// Steering: pick features with strengths and a method (or a preset), stream the default and
// the steered continuation side by side, save the choice as a preset (a new version), and
// list the stored runs.
"use strict";
(function () {
  const S = window.saereg;
  const page = document.getElementById("steer-page");
  if (!page) return;
  const ref = page.dataset.ref;
  const readOnly = page.dataset.readOnly === "true";
  const presets = JSON.parse(document.getElementById("preset-data").textContent);
  const rows = document.getElementById("steer-features");
  const template = rows.querySelector(".steer-feature").cloneNode(true);
  const presetSelect = document.getElementById("preset");
  const method = document.getElementById("method");
  const runButton = document.getElementById("run");
  const out = {default: document.getElementById("default-output"),
               steered: document.getElementById("steered-output")};
  const status = document.getElementById("steer-status");
  const runs = document.getElementById("runs");
  let controller = null;

  function addRow(index, strength) {
    const row = template.cloneNode(true);
    row.querySelector("input.index").value = index === undefined ? "" : index;
    row.querySelector("input.strength").value = strength === undefined ? 8 : strength;
    rows.append(row);
    return row;
  }

  function features() {
    const picked = [];
    for (const row of rows.querySelectorAll(".steer-feature")) {
      const index = row.querySelector("input.index").value;
      const strength = row.querySelector("input.strength").value;
      if (index === "") continue;
      picked.push({index: parseInt(index, 10), strength: parseFloat(strength)});
    }
    return picked;
  }

  function number(id) {
    const v = document.getElementById(id).value;
    return v === "" ? null : Number(v);
  }

  function loadPreset(name) {
    const p = presets.find((x) => x.ref === name);
    if (!p) return;
    rows.replaceChildren();
    p.features.forEach((f) => addRow(f.index, f.strength));
    method.value = p.method;
    const g = p.generation || {};
    if (g.max_new_tokens) document.getElementById("max-new-tokens").value = g.max_new_tokens;
    if (g.seed !== undefined) document.getElementById("seed").value = g.seed;
    if (g.temperature !== undefined) document.getElementById("temperature").value = g.temperature;
  }

  function runItem(r) {
    const li = S.el("li", {"class": "run", "data-run-id": r.run_id});
    li.append(S.el("div", {"class": "meta"}, "#" + r.run_id + " · " + r.preset + " · seed " + r.seed),
              S.el("div", {"class": "run-prompt"}, r.prompt));
    const cols = S.el("div", {"class": "columns"});
    cols.append(S.el("pre", {"class": "output"}, r.default), S.el("pre", {"class": "output"}, r.steered));
    li.append(cols);
    return li;
  }

  rows.addEventListener("click", (event) => {
    if (!event.target.classList.contains("remove")) return;
    const row = event.target.closest(".steer-feature");
    if (rows.querySelectorAll(".steer-feature").length > 1) row.remove();
    else row.querySelector("input.index").value = "";
    presetSelect.value = "";
  });
  rows.addEventListener("input", () => { presetSelect.value = ""; });
  method.addEventListener("change", () => { presetSelect.value = ""; });
  document.getElementById("add-feature").addEventListener("click", () => {
    addRow();
    presetSelect.value = "";
  });
  presetSelect.addEventListener("change", () => loadPreset(presetSelect.value));
  if (page.dataset.chosen) loadPreset(page.dataset.chosen);

  runButton.addEventListener("click", async () => {
    if (controller) controller.abort();
    controller = new AbortController();
    const text = document.getElementById("steer-prompt").value;
    const body = {prompt: text, max_new_tokens: number("max-new-tokens"), seed: number("seed"),
                  temperature: number("temperature")};
    if (presetSelect.value) body.preset = presetSelect.value;
    else { body.features = features(); body.method = method.value; }
    out.default.textContent = text;
    out.steered.textContent = text;
    status.textContent = "generating…";
    runButton.disabled = true;
    try {
      await S.stream("/api/sae/" + encodeURIComponent(ref) + "/steer", body, (name, data) => {
        if (name === "message") out[data.side].textContent += data.text;
        else if (name === "done") {
          out.default.textContent = text + data.default;
          out.steered.textContent = text + data.steered;
          status.textContent = data.run_id ? "stored as run " + data.run_id + " (" + data.preset + ")"
                                           : "not stored (read-only server)";
          if (data.run_id) runs.prepend(runItem(Object.assign({prompt: text}, data)));
        } else if (name === "error") S.showError(data.detail);
      }, controller.signal);
      S.showError("");
    } catch (e) {
      if (e.name !== "AbortError") { S.showError(e.message); status.textContent = ""; }
    } finally {
      runButton.disabled = false;
    }
  });

  document.getElementById("save-preset").addEventListener("click", async () => {
    const saved = document.getElementById("save-status");
    const body = {name: document.getElementById("preset-name").value.trim(), sae: ref,
                  features: features(), method: method.value,
                  max_new_tokens: number("max-new-tokens"), seed: number("seed"),
                  temperature: number("temperature")};
    try {
      const p = await S.postJSON("/api/presets", body);
      presets.push({ref: p.ref, method: p.method, generation: p.generation,
                    features: p.features.map((f) => ({index: f.index, strength: f.strength}))});
      presetSelect.append(S.el("option", {value: p.ref}, p.ref + " (" + p.method + ")"));
      presetSelect.value = p.ref;
      saved.textContent = "saved " + p.ref;
      S.showError("");
    } catch (e) {
      S.showError(e.message);
      saved.textContent = "";
    }
  });
  if (readOnly) document.getElementById("save-preset").disabled = true;
})();
