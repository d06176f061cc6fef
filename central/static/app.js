// Triptych's web page: submits jobs to /v1/jobs, follows their Server-Sent Events, shows the recent jobs.
// No framework, no build step. Talks to the public API only, sending the API key itself when the server
// wants one (SPEC §13): EventSource cannot send headers, so the events are read with fetch() and a stream
// parser that resumes with Last-Event-ID.
"use strict";

(() => {
  const KEY_NAME = "triptych.apiKey";
  const GALLERY_SIZE = 24;
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  // What a txt2img job's resolved parameters may carry back into a new request (the request model refuses
  // unknown fields; `scheduler_class` is derived, ControlNets need their images).
  const RERUN_FIELDS = [
    "prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "scheduler",
    "seed", "num_images", "output_format", "model", "loras",
  ];
  const FORM_FIELDS = ["prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
    "scheduler", "seed"];

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), form: $("generate-form"), generate: $("generate"), scheduler: $("scheduler"),
    currentJob: $("current-job"), progress: $("progress"), progressText: $("progress-text"), cancel: $("cancel"),
    previewFigure: $("preview-figure"), preview: $("preview"), previewCaption: $("preview-caption"),
    result: $("result"), gallery: $("gallery"), refresh: $("refresh"),
    details: $("details"), detailsHeading: $("details-heading"), detailsStatus: $("details-status"),
    detailsImages: $("details-images"), detailsParameters: $("details-parameters"), rerun: $("rerun"),
    useSettings: $("use-settings"), detailsCancel: $("details-cancel"), closeDetails: $("close-details"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("api-key"), rememberKey: $("remember-key"),
    cancelKey: $("cancel-key"), keyWhy: $("key-why"), changeKey: $("change-key"),
  };

  // ------------------------------------------------------------------ status messages (aria-live)
  function say(message, kind = "info") {
    el.status.textContent = message;
    el.status.dataset.kind = kind;
  }

  // ------------------------------------------------------------------ the API key
  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
    } catch {
      return "";
    }
  }

  function storeKey(key, remember) {
    try {
      sessionStorage.removeItem(KEY_NAME);
      localStorage.removeItem(KEY_NAME);
      if (key) (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
    } catch {
      // storage disabled: the key lives in memory only
    }
    memoryKey = key;
    if (key) el.changeKey.hidden = false;
  }

  let memoryKey = storedKey();
  el.changeKey.hidden = !memoryKey;
  let keyPrompt = null; // one dialog for every request that got 401 at the same time

  function askKey(rejected) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      el.keyWhy.textContent = rejected
        ? "The server refused the API key. Enter a valid key (TRIPTYCH_API_KEYS)."
        : "This server asks for an API key (TRIPTYCH_API_KEYS). It is kept in this browser and sent as " +
          "Authorization: Bearer on the page's own requests.";
      el.keyInput.value = "";
      const finish = (key) => {
        el.keyForm.removeEventListener("submit", onSubmit);
        el.cancelKey.removeEventListener("click", onCancel);
        el.keyDialog.removeEventListener("cancel", onCancel);
        if (el.keyDialog.open) el.keyDialog.close();
        keyPrompt = null;
        resolve(key);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = el.keyInput.value.trim();
        if (!key) {
          el.keyInput.focus();
          return;
        }
        storeKey(key, el.rememberKey.checked);
        finish(key);
      };
      const onCancel = (event) => {
        event.preventDefault();
        finish(null);
      };
      el.keyForm.addEventListener("submit", onSubmit);
      el.cancelKey.addEventListener("click", onCancel);
      el.keyDialog.addEventListener("cancel", onCancel);
      el.keyDialog.showModal();
      el.keyInput.focus();
    });
    return keyPrompt;
  }

  // ------------------------------------------------------------------ fetch with the key and the envelope
  class ApiError extends Error {
    constructor(status, type, message, param) {
      super(message);
      this.status = status;
      this.type = type;
      this.param = param;
    }
  }

  async function errorOf(response) {
    let type = "http_error";
    let message = `HTTP ${response.status}`;
    let param = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        type = body.error.type || type;
        message = body.error.message || message;
        param = body.error.param || null;
      }
    } catch {
      // not JSON: keep the status line
    }
    return new ApiError(response.status, type, message, param);
  }

  // fetch(), with `Authorization: Bearer` once a key is known; a 401 asks for the key and retries.
  async function authFetch(path, options = {}) {
    for (let attempt = 0; ; attempt++) {
      const headers = new Headers(options.headers || {});
      const key = memoryKey;
      if (key) headers.set("Authorization", `Bearer ${key}`);
      let response;
      try {
        response = await fetch(path, { ...options, headers, credentials: "same-origin" });
      } catch (err) {
        if (err && err.name === "AbortError") throw err;
        throw new ApiError(0, "network", "Cannot reach the server: is central running?", null);
      }
      if (response.status !== 401 || attempt >= 5) return response;
      el.changeKey.hidden = false; // this server wants a key: let the user change it later
      // The key in use (if any) was refused: ask for one, unless another request already got a new one.
      if (memoryKey && memoryKey !== key) continue;
      if (key) storeKey("", false);
      const fresh = await askKey(Boolean(key));
      if (!fresh) throw new ApiError(401, "unauthorized", "An API key is needed to use this server.", null);
    }
  }

  async function api(path, options = {}) {
    const response = await authFetch(path, options);
    if (!response.ok) throw await errorOf(response);
    return response.status === 204 ? null : response.json();
  }

  function postJson(path, body) {
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }

  // Images of a job are immutable: fetch each once (with the key) and keep an object URL.
  const imageUrls = new Map();
  function imageUrl(path) {
    if (!imageUrls.has(path)) {
      const promise = authFetch(path).then(async (response) => {
        if (!response.ok) throw await errorOf(response);
        return URL.createObjectURL(await response.blob());
      });
      promise.catch(() => imageUrls.delete(path));
      imageUrls.set(path, promise);
    }
    return imageUrls.get(path);
  }

  function imageUrlsOf(job) {
    if (Array.isArray(job.image_urls)) return job.image_urls;
    const count = job.output && Array.isArray(job.output.images) ? job.output.images.length : 0;
    return Array.from({ length: count }, (_, i) => `/v1/jobs/${encodeURIComponent(job.id)}/images/${i}`);
  }

  // ------------------------------------------------------------------ Server-Sent Events over fetch()
  // Calls onEvent({event, data, id}) for each event; resumes with Last-Event-ID after a dropped connection;
  // resolves after a terminal event (or when `signal` aborts).
  async function followEvents(path, onEvent, signal) {
    let lastId = null;
    let retryMs = 1000;
    let failures = 0;
    while (!signal.aborted) {
      let finished = false;
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await authFetch(path, { headers, signal, cache: "no-store" });
        if (!response.ok) {
          const err = await errorOf(response);
          if (response.status < 500 && response.status !== 429) throw err; // 404, 401 refused: give up
          throw Object.assign(err, { retry: true });
        }
        failures = 0;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        let event = { event: "", data: [], id: null };
        const dispatch = () => {
          if (event.id !== null) lastId = event.id;
          if (event.data.length) {
            let data = event.data.join("\n");
            try {
              data = JSON.parse(data);
            } catch {
              // keep the text
            }
            const name = event.event || "message";
            onEvent({ event: name, data, id: lastId });
            if (TERMINAL.has(name)) finished = true;
          }
          event = { event: "", data: [], id: null };
        };
        while (!finished) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          // A trailing \r may be the first half of \r\n: it waits for the next chunk, as does an unfinished line.
          const held = buffer.endsWith("\r") ? "\r" : "";
          const lines = (held ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
          buffer = lines.pop() + held;
          for (const line of lines) {
            if (line === "") {
              dispatch();
              if (finished) break;
              continue;
            }
            if (line.startsWith(":")) continue; // a comment: keep-alive
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" ")) value = value.slice(1);
            if (field === "event") event.event = value;
            else if (field === "data") event.data.push(value);
            else if (field === "id" && !value.includes("\0")) event.id = value;
            else if (field === "retry" && /^\d+$/.test(value)) retryMs = Number(value);
          }
        }
        if (finished) {
          reader.cancel().catch(() => {});
          return;
        }
      } catch (err) {
        if (signal.aborted || (err && err.name === "AbortError")) return;
        if (err instanceof ApiError && !err.retry && err.type !== "network") throw err;
        failures += 1;
        if (failures > 20) throw err;
      }
      // The stream ended (or failed) before a terminal event: reconnect, resuming after the last id.
      await sleep(Math.min(retryMs * 2 ** Math.max(0, failures - 1), 15000), signal);
    }
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve();
      }, { once: true });
    });
  }

  // ------------------------------------------------------------------ the current job
  let current = null; // {id, cancelUrl, controller}

  function setProgress(step, steps) {
    if (steps > 0) el.progress.max = steps;
    el.progress.value = Math.min(step, el.progress.max);
    el.progress.setAttribute("aria-valuetext", steps > 0 ? `Step ${step} of ${steps}` : "Waiting");
  }

  async function follow(job) {
    if (current) current.controller.abort();
    const controller = new AbortController();
    current = { id: job.id, cancelUrl: (job.urls && job.urls.cancel) || `/v1/jobs/${job.id}/cancel`, controller };
    const eventsUrl = (job.urls && job.urls.events) || `/v1/jobs/${encodeURIComponent(job.id)}/events`;
    el.currentJob.textContent = `Job ${job.id}: queued`;
    el.progressText.textContent = "Waiting for the job to start.";
    setProgress(0, 0);
    el.progress.value = 0;
    el.previewFigure.hidden = true;
    el.result.replaceChildren();
    el.cancel.disabled = false;
    try {
      await followEvents(eventsUrl, (message) => onJobEvent(job.id, message), controller.signal);
    } catch (err) {
      if (current && current.id === job.id) {
        say(`Lost the job's progress: ${err.message}`, "error");
        el.cancel.disabled = true;
      }
    }
  }

  function onJobEvent(id, { event, data }) {
    if (!current || current.id !== id) return;
    const d = data && typeof data === "object" ? data : {};
    switch (event) {
      case "queued":
        el.currentJob.textContent = `Job ${id}: queued`;
        say("Job queued.");
        break;
      case "started":
        el.currentJob.textContent = `Job ${id}: running`;
        say("Generating…");
        break;
      case "requeued":
        el.currentJob.textContent = `Job ${id}: queued again`;
        say("The job was interrupted and is queued again.");
        break;
      case "progress": {
        const step = Number(d.step) || 0;
        const steps = Number(d.steps) || 0;
        setProgress(step, steps);
        const eta = typeof d.eta_s === "number" && step < steps ? `, about ${formatSeconds(d.eta_s)} left` : "";
        el.progressText.textContent = `Step ${step} of ${steps}${eta}`;
        break;
      }
      case "preview":
        if (typeof d.image === "string" && d.image) {
          el.preview.src = `data:image/jpeg;base64,${d.image}`;
          el.preview.alt = `Preview at step ${d.step}`;
          el.previewCaption.textContent = `Preview, step ${d.step}`;
          el.previewFigure.hidden = false;
        }
        break;
      case "succeeded":
        setProgress(el.progress.max, el.progress.max);
        el.progressText.textContent = "Done.";
        el.currentJob.textContent = `Job ${id}: succeeded`;
        el.cancel.disabled = true;
        say("Done.", "success");
        showResult(id);
        break;
      case "failed":
        el.currentJob.textContent = `Job ${id}: failed`;
        el.progressText.textContent = "Failed.";
        el.cancel.disabled = true;
        say(`The job failed: ${errorText(d.error)}`, "error");
        loadGallery();
        break;
      case "canceled":
        el.currentJob.textContent = `Job ${id}: canceled`;
        el.progressText.textContent = "Canceled.";
        el.cancel.disabled = true;
        say("The job was canceled.");
        loadGallery();
        break;
      default:
        break;
    }
  }

  async function showResult(id) {
    try {
      const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
      if (!current || current.id !== id) return;
      const seeds = (job.output && job.output.seeds) || [];
      await renderImages(el.result, job, (i) => `Result image ${i + 1}${seeds[i] !== undefined ? ` (seed ${seeds[i]})` : ""}`);
    } catch (err) {
      say(`Could not load the result: ${err.message}`, "error");
    }
    loadGallery();
  }

  async function renderImages(container, job, altOf) {
    const paths = imageUrlsOf(job);
    const figures = await Promise.all(paths.map(async (path, i) => {
      const url = await imageUrl(path);
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url;
      img.alt = altOf(i);
      const link = document.createElement("a");
      link.href = url;
      const format = (job.output && job.output.parameters && job.output.parameters.output_format) || "png";
      link.download = `triptych-${job.id}-${i + 1}.${format === "jpeg" ? "jpg" : format}`;
      link.textContent = `Download image ${i + 1}`;
      const caption = document.createElement("figcaption");
      caption.append(link);
      figure.append(img, caption);
      return figure;
    }));
    container.replaceChildren(...figures);
  }

  async function cancelJob(id, cancelUrl) {
    say("Canceling…"); // before the request: the `canceled` event may arrive before its answer
    try {
      await api(cancelUrl || `/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    } catch (err) {
      if (err.status === 409) say("The job had already finished.");
      else say(`Could not cancel: ${err.message}`, "error");
    }
  }

  // ------------------------------------------------------------------ submitting
  function clearInvalid() {
    for (const name of FORM_FIELDS) $(name).removeAttribute("aria-invalid");
  }

  function numberOrNull(id) {
    const value = $(id).value.trim();
    return value === "" ? null : Number(value);
  }

  function formRequest() {
    const body = { task: "txt2img", prompt: $("prompt").value, num_images: 1, output_format: "png" };
    const negative = $("negative_prompt").value;
    if (negative.trim()) body.negative_prompt = negative;
    for (const name of ["width", "height", "num_inference_steps", "guidance_scale", "seed"]) {
      const value = numberOrNull(name);
      if (value !== null) body[name] = value;
    }
    if (el.scheduler.value) body.scheduler = el.scheduler.value;
    return body;
  }

  async function submit(body) {
    clearInvalid();
    const request = { ...body };
    el.generate.disabled = true;
    el.rerun.disabled = true;
    say("Submitting…");
    try {
      const job = await postJson("/v1/jobs", request);
      loadGallery();
      follow(job);
    } catch (err) {
      const field = err.param && FORM_FIELDS.includes(err.param) ? $(err.param) : null;
      if (field) {
        field.setAttribute("aria-invalid", "true");
        field.focus();
      }
      say(`Not submitted: ${err.message}`, "error");
    } finally {
      el.generate.disabled = false;
      el.rerun.disabled = false;
    }
  }

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!$("prompt").value.trim()) {
      $("prompt").setAttribute("aria-invalid", "true");
      $("prompt").focus();
      say("Write a prompt first.", "error");
      return;
    }
    submit(formRequest());
  });

  el.cancel.addEventListener("click", () => {
    if (current) cancelJob(current.id, current.cancelUrl);
  });

  // ------------------------------------------------------------------ samplers
  async function loadSchedulers() {
    try {
      const list = await api("/v1/schedulers");
      const keep = el.scheduler.value;
      const options = [new Option("Model default", "")];
      for (const entry of list) {
        const group = document.createElement("optgroup");
        group.label = entry.name;
        group.append(new Option(entry.name, entry.name));
        for (const alias of entry.aliases || []) group.append(new Option(alias, alias));
        options.push(group);
      }
      el.scheduler.replaceChildren(...options);
      el.scheduler.value = keep;
      return true;
    } catch (err) {
      say(`Could not load the samplers: ${err.message}`, "error");
      return err.status !== 401;
    }
  }

  // ------------------------------------------------------------------ gallery and details
  let galleryLoading = null;
  let galleryAgain = false;
  let shown = null; // the job in the details panel

  function loadGallery() {
    if (galleryLoading) {
      galleryAgain = true;
      return galleryLoading;
    }
    galleryLoading = (async () => {
      try {
        const { jobs } = await api(`/v1/jobs?limit=${GALLERY_SIZE}`);
        renderGallery(jobs || []);
      } catch (err) {
        say(`Could not load the recent jobs: ${err.message}`, "error");
      } finally {
        galleryLoading = null;
        if (galleryAgain) {
          galleryAgain = false;
          loadGallery();
        }
      }
    })();
    return galleryLoading;
  }

  function promptOf(job) {
    const p = (job.output && job.output.parameters) || job.request || {};
    return p.prompt || `(${job.task || "job"})`;
  }

  function renderGallery(jobs) {
    if (!jobs.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No jobs yet.";
      el.gallery.replaceChildren(empty);
      return;
    }
    el.gallery.replaceChildren(...jobs.map((job) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "gallery-item";
      button.dataset.jobId = job.id;
      button.dataset.status = job.status;
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const paths = job.status === "succeeded" ? imageUrlsOf(job) : [];
      if (paths.length) {
        const img = document.createElement("img");
        img.alt = "";
        img.loading = "lazy";
        img.width = 128;
        img.height = 128;
        thumb.append(img);
        imageUrl(paths[0]).then((url) => { img.src = url; }).catch(() => { thumb.textContent = "no image"; });
      } else {
        thumb.textContent = job.status;
      }
      const caption = document.createElement("span");
      caption.className = "caption";
      const text = document.createElement("span");
      text.className = "prompt";
      text.textContent = promptOf(job);
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${job.status}${job.created_at ? ` · ${formatTime(job.created_at)}` : ""}`;
      caption.append(text, meta);
      button.append(thumb, caption);
      button.addEventListener("click", () => showDetails(job.id));
      item.append(button);
      return item;
    }));
    if (shown && jobs.some((job) => job.id === shown.id && job.status !== shown.status)) showDetails(shown.id, false);
  }

  function displayValue(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  async function showDetails(id, focus = true) {
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      say(`Could not load the job: ${err.message}`, "error");
      return;
    }
    shown = job;
    el.details.hidden = false;
    el.detailsHeading.textContent = `Job ${job.id}`;
    const parts = [`Status: ${job.status}`];
    if (job.progress && job.progress.steps) parts.push(`step ${job.progress.step} of ${job.progress.steps}`);
    if (job.created_at) parts.push(`created ${formatTime(job.created_at)}`);
    if (job.error) parts.push(`error: ${errorText(job.error)}`);
    el.detailsStatus.textContent = parts.join(" · ");

    const parameters = (job.output && job.output.parameters) || job.request || {};
    const rows = [];
    for (const [name, value] of Object.entries(parameters)) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = displayValue(value);
      dd.dataset.param = name;
      rows.push(dt, dd);
    }
    if (job.output && job.output.timings && job.output.timings.total_ms !== undefined) {
      const dt = document.createElement("dt");
      dt.textContent = "total time";
      const dd = document.createElement("dd");
      dd.textContent = formatSeconds(job.output.timings.total_ms / 1000);
      rows.push(dt, dd);
    }
    el.detailsParameters.replaceChildren(...rows);

    const seeds = (job.output && job.output.seeds) || [];
    el.detailsImages.replaceChildren();
    if (job.status === "succeeded") {
      renderImages(el.detailsImages, job, (i) => `Image ${i + 1} of job ${job.id}${seeds[i] !== undefined ? ` (seed ${seeds[i]})` : ""}`)
        .catch((err) => say(`Could not load the images: ${err.message}`, "error"));
    }
    const rerunnable = (job.task || "txt2img") === "txt2img" && parameters.seed !== undefined && parameters.seed !== null;
    el.rerun.hidden = !rerunnable;
    el.useSettings.hidden = (job.task || "txt2img") !== "txt2img";
    el.detailsCancel.hidden = TERMINAL.has(job.status);
    if (focus) el.detailsHeading.focus();
  }

  function rerunBody(job) {
    const parameters = (job.output && job.output.parameters) || job.request || {};
    const body = { task: "txt2img" };
    for (const name of RERUN_FIELDS) {
      const value = parameters[name];
      if (value === undefined || value === null) continue;
      if (Array.isArray(value) && !value.length) continue;
      if (name === "model" && value === "base") continue;
      body[name] = value;
    }
    return body;
  }

  el.rerun.addEventListener("click", () => {
    if (shown) submit(rerunBody(shown));
  });

  el.useSettings.addEventListener("click", () => {
    if (!shown) return;
    const body = rerunBody(shown);
    for (const name of FORM_FIELDS) {
      if (name === "scheduler") {
        const value = body.scheduler || "";
        if (value && ![...el.scheduler.options].some((o) => o.value === value)) el.scheduler.append(new Option(value, value));
        el.scheduler.value = value;
      } else {
        $(name).value = body[name] === undefined ? "" : String(body[name]);
      }
    }
    say("The form now holds that job's settings.");
    $("prompt").focus();
  });

  el.detailsCancel.addEventListener("click", () => {
    if (shown) cancelJob(shown.id).then(() => showDetails(shown.id, false));
  });

  el.closeDetails.addEventListener("click", () => {
    el.details.hidden = true;
    shown = null;
  });

  el.refresh.addEventListener("click", () => loadGallery());

  el.changeKey.addEventListener("click", async () => {
    const key = await askKey(false);
    if (key) {
      say("API key saved.");
      loadSchedulers();
      loadGallery();
    }
  });

  // ------------------------------------------------------------------ formatting
  function errorText(error) {
    if (!error) return "unknown error";
    if (typeof error === "string") return error;
    return error.message || error.type || JSON.stringify(error);
  }

  function formatSeconds(s) {
    if (!Number.isFinite(s)) return "?";
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 120) return `${Math.round(s)} s`;
    return `${Math.round(s / 60)} min`;
  }

  function formatTime(value) {
    let date;
    if (typeof value === "number") date = new Date(value > 1e12 ? value : value * 1000);
    else date = new Date(value);
    return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
  }

  // ------------------------------------------------------------------ start
  (async () => {
    // One request first: if the server wants a key, the page asks once, then loads the rest with it.
    if (!(await loadSchedulers())) return; // no key given: ask again only when the user acts
    await loadGallery();
    // Pick up a job still in progress (the page was reloaded while it ran).
    const running = el.gallery.querySelector('.gallery-item[data-status="running"], .gallery-item[data-status="queued"]');
    if (running && !current) follow({ id: running.dataset.jobId });
  })();
})();
