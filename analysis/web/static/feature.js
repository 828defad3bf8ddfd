// The feature page: add a label, accept or reject one, then redraw the label history from
// the feature's JSON (the same library call as `saereg label`).
"use strict";
(function () {
  const S = window.saereg;
  const page = document.getElementById("feature-page");
  if (!page) return;
  const ref = page.dataset.ref, index = page.dataset.index;
  const base = "/api/sae/" + encodeURIComponent(ref) + "/feature/" + index;
  const history = document.getElementById("label-history");
  const form = document.getElementById("add-label");
  const readOnly = form.querySelector("button").disabled;

  function when(iso) {
    return iso ? iso.slice(0, 16).replace("T", " ") : "-";
  }

  function labelItem(l) {
    const li = S.el("li", {"class": "label status-" + l.status, "data-label-id": l.id});
    li.append(S.el("span", {"class": "label-text"}, l.text));
    const meta = S.el("span", {"class": "meta"});
    meta.append(S.el("span", {"class": "method"}, l.method + (l.model ? "/" + l.model : "")),
                " · ", S.el("span", {"class": "author"}, l.author),
                " · ", S.el("span", {"class": "status"}, l.status),
                " · ", S.el("span", {"class": "score"},
                            "score " + (l.score === null ? "-" : Number(l.score).toFixed(2))),
                " · ", S.el("time", {}, when(l.created_at)));
    if (l.supersedes) meta.append(" · supersedes #" + l.supersedes);
    li.append(meta, " ",
              S.el("button", {type: "button", "class": "accept", "data-label-id": l.id,
                              disabled: readOnly}, "accept"), " ",
              S.el("button", {type: "button", "class": "reject", "data-label-id": l.id,
                              disabled: readOnly}, "reject"));
    return li;
  }

  async function redraw() {
    const data = await S.getJSON(base);
    history.replaceChildren(...data.labels.map(labelItem));
    document.getElementById("label-current").textContent = data.label ? data.label.text : "";
    document.getElementById("label-none").hidden = !!data.label;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = form.querySelector("input[name=text]");
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      await S.postJSON(base + "/labels", {text: input.value});
      input.value = "";
      S.showError("");
      await redraw();
    } catch (e) {
      S.showError(e.message);
    } finally {
      button.disabled = readOnly;
    }
  });

  history.addEventListener("click", async (event) => {
    const button = event.target.closest("button.accept, button.reject");
    if (!button) return;
    const status = button.classList.contains("accept") ? "accepted" : "rejected";
    button.disabled = true;
    try {
      await S.postJSON("/api/labels/" + button.dataset.labelId + "/status", {status: status});
      S.showError("");
      await redraw();
    } catch (e) {
      S.showError(e.message);
      button.disabled = readOnly;
    }
  });
})();
