// The search page of `dinoforge serve`: plain JS, no build step, no network beyond this server.
// Flow: GET /v1/card (model, index, head) -> a query image (file, drop, paste, or a clicked result)
// -> POST /v1/query (one round trip: neighbours with thumbnails, labels, patch-PCA values) -> render.
"use strict";

(() => {
  const KEY_NAME = "dinoforge-api-key";
  const $ = (id) => document.getElementById(id);
  let card = null;        // GET /v1/card once loaded
  let retry = null;       // what to redo once a key is given (after a 401)
  let queryUrl = null;    // object URL of the query preview (revoked when replaced)

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function setState(state) { document.body.dataset.state = state; }

  function showMessage(text) {
    const box = $("message");
    box.textContent = text;
    box.hidden = !text;
  }

  function status(text) { $("status").textContent = text; }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_NAME);
    if (key) headers.set("Authorization", "Bearer " + key);
    const response = await fetch(path, { ...options, headers });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const reason = body && body.error ? body.error.message : response.statusText;
      throw new ApiError(response.status, reason || "HTTP " + response.status);
    }
    return body;
  }

  function askForKey(err, again) {
    retry = again;
    const hadKey = sessionStorage.getItem(KEY_NAME) !== null;
    sessionStorage.removeItem(KEY_NAME);
    showMessage(hadKey ? "The server refused this API key (" + err.message + "). Enter a valid key."
                       : "This server needs an API key. Enter it below.");
    $("key-form").hidden = false;
    $("key-input").focus();
    setState("key");
  }

  // One place that turns any failure into a sentence on the page.
  function fail(err, again) {
    if (err instanceof ApiError && err.status === 401) return askForKey(err, again);
    const prefix = err instanceof ApiError ? "The server answered " + err.status + ": " : "";
    showMessage(prefix + err.message);
    status("");
    setState("error");
  }

  function describeCard(c) {
    const m = c.model;
    const parts = [m.name + " (" + m.backend + ", D=" + m.embed_dim + ", patch " + m.patch_size + ", " +
                   m.preprocessing.size + " px, " + m.pooling + " pooling)"];
    parts.push(c.index ? "index: " + c.index.count.toLocaleString() + " images" : "no index");
    if (c.head) parts.push("classifier: " + c.head.kind + ", " + c.head.classes + " classes");
    if (!m.patch_tokens) parts.push("no patch tokens (no PCA view)");
    return parts.join(" · ");
  }

  async function loadCard() {
    try {
      card = await api("/v1/card");
    } catch (err) {
      if (err instanceof ApiError && err.status === 503) {  // still warming up
        status("The model is loading…");
        setTimeout(loadCard, 500);
        return;
      }
      return fail(err, loadCard);
    }
    $("card").textContent = describeCard(card);
    showMessage("");
    if (!card.index) showMessage("This server has no image index: start it with --index DIR " +
                                 "(made by `dinoforge index build`).");
    else if (card.index.count === 0) showMessage("The index is empty: add images with `dinoforge index build`.");
    status("Ready: choose, drop or paste an image.");
    setState("ready");
    performance.mark("dinoforge-interactive");
  }

  function checkFile(blob) {
    if (blob.type && !blob.type.startsWith("image/")) {
      return "That file is not an image (" + blob.type + "); choose a JPEG, PNG or WebP picture.";
    }
    const limit = card ? card.limits.max_payload_bytes : Infinity;
    if (blob.size > limit) {
      return "That image is too large (" + (blob.size / 1e6).toFixed(1) + " MB); this server accepts up to " +
             (limit / 1e6).toFixed(1) + " MB.";
    }
    if (blob.size === 0) return "That file is empty.";
    return null;
  }

  function drawPca(pca) {
    const canvas = $("pca");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!pca) return;
    const [h, w] = pca.grid;
    const rgb = Uint8Array.from(atob(pca.rgb), (c) => c.charCodeAt(0));
    const rgba = new Uint8ClampedArray(h * w * 4);
    for (let i = 0; i < h * w; i++) {
      rgba.set(rgb.subarray(3 * i, 3 * i + 3), 4 * i);
      rgba[4 * i + 3] = 255;
    }
    const small = document.createElement("canvas");
    small.width = w;
    small.height = h;
    small.getContext("2d").putImageData(new ImageData(rgba, w, h), 0, 0);
    const scale = Math.min(canvas.width / w, canvas.height / h);
    ctx.imageSmoothingEnabled = false;  // one block per patch: the grid is the information
    ctx.drawImage(small, (canvas.width - w * scale) / 2, (canvas.height - h * scale) / 2, w * scale, h * scale);
  }

  function renderLabels(predictions) {
    const list = $("label-list");
    list.replaceChildren();
    $("labels").hidden = !predictions;
    for (const p of predictions || []) {
      const li = document.createElement("li");
      li.textContent = p.label + " — " + (100 * p.score).toFixed(1) + "%";
      list.append(li);
    }
  }

  function resultItem(match, rank) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = match.id;
    const label = match.metadata && match.metadata.label !== undefined ? " (" + match.metadata.label + ")" : "";
    button.setAttribute("aria-label", "result " + rank + ": " + match.id + label + ", score " +
                        match.score.toFixed(3) + "; search from this image");
    if (match.thumbnail) {
      const img = document.createElement("img");
      img.src = match.thumbnail;
      img.alt = "";
      button.append(img);
    } else {
      const none = document.createElement("span");
      none.className = "noimg";
      none.textContent = "no thumbnail";
      button.append(none);
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = match.score.toFixed(3);
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = match.id + label;
    button.append(score, id);
    if (match.thumbnail) {
      button.addEventListener("click", async () => search(await (await fetch(match.thumbnail)).blob()));
    } else {
      button.disabled = true;
    }
    li.append(button);
    return li;
  }

  function render(body, blob) {
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = URL.createObjectURL(blob);
    $("query-img").src = queryUrl;
    $("query").hidden = false;
    drawPca(body.pca);
    $("pca-caption").textContent = body.pca
      ? "patch PCA, " + body.pca.grid[0] + "×" + body.pca.grid[1] + " patches, " +
        Math.round(100 * body.pca.foreground) + "% foreground"
      : body.pca_error;
    renderLabels(body.classification);
    $("results").replaceChildren(...body.matches.map((m, i) => resultItem(m, i + 1)));
    const ms = body.timing ? " in " + Math.round(body.timing.total_ms || 0) + " ms" : "";
    status(body.matches.length + " results" + ms + ".");
  }

  async function search(blob) {
    const problem = checkFile(blob);
    if (problem) {
      showMessage(problem);
      setState("error");
      return;
    }
    showMessage("");
    status("Searching…");
    setState("searching");
    const form = new FormData();
    form.append("file", blob, blob.name || "query");
    form.append("top_k", String(Math.max(1, Math.min(100, Number($("top-k").value) || 12))));
    try {
      render(await api("/v1/query", { method: "POST", body: form }), blob);
      setState("done");
    } catch (err) {
      fail(err, () => search(blob));
    }
  }

  function firstImage(items) {
    for (const item of items || []) {
      const file = item.kind === undefined ? item : (item.kind === "file" ? item.getAsFile() : null);
      if (file) return file;
    }
    return null;
  }

  function wire() {
    $("file").addEventListener("change", (e) => { if (e.target.files[0]) search(e.target.files[0]); });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = firstImage(e.dataTransfer.files);
      if (file) search(file);
    });
    document.addEventListener("paste", (e) => {
      const file = firstImage(e.clipboardData && e.clipboardData.items);
      if (file) { e.preventDefault(); search(file); }
    });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY_NAME, $("key-input").value.trim());
      $("key-input").value = "";
      $("key-form").hidden = true;
      showMessage("");
      const again = retry || loadCard;  // the call the 401 interrupted
      retry = null;
      again();
    });
  }

  // For scripts driving the page (tests, benchmarks): search a Blob and resolve once the grid is shown.
  window.dinoforgePage = { search, state: () => document.body.dataset.state };
  wire();
  loadCard();
})();
