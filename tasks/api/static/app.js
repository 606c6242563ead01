// The page of the pg_broker API: submit a package, watch every job of yours
// move (Server-Sent Events read with fetch(), which can send the token), and
// play each chapter from its signed URL. No build step, no dependencies.
"use strict";

const state = { token: null, streams: new Map() };
const $ = (id) => document.getElementById(id);

function signIn(token) {
  for (const controller of state.streams.values()) controller.abort();
  state.streams.clear();
  $("jobs").replaceChildren();
  delete $("jobs").dataset.loaded;
  state.token = token;
  localStorage.setItem("pgbroker.token", token);
  try {
    const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    $("who").textContent = `Signed in as ${claims.sub}.`;
    $("signin").hidden = true;
  } catch (e) {
    $("who").textContent = "Signed in.";
  }
  loadJobs();
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${state.token}` },
  });
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (e) {
    body = null;  // not JSON: a proxy's or server's error page
  }
  if (!response.ok) {
    throw new Error(body && body.message ? body.message : `${response.status} ${response.statusText}`);
  }
  return body;
}

function parseChapters(text) {
  return text.split(/^---\s*$/m).map((block) => block.trim()).filter(Boolean).map((block) => {
    const [title, ...rest] = block.split("\n");
    return { title: title.trim(), text: rest.join("\n").trim() || title.trim() };
  });
}

async function submit(event) {
  event.preventDefault();
  $("message").textContent = "";
  try {
    const job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify({
        title: $("title").value, chapters: parseChapters($("chapters").value), voice: $("voice").value,
      }),
    });
    render(job);
    follow(job);
  } catch (e) {
    $("message").textContent = e.message;
  }
}

function card(job) {
  let element = document.querySelector(`.job[data-id="${job.id}"]`);
  if (!element) {
    element = document.createElement("div");
    element.className = "job";
    element.dataset.id = job.id;
    element.innerHTML = `<header><strong class="title"></strong><span class="status"></span></header>
      <div class="bar"><div></div></div><div class="counts"></div><div class="files"></div>`;
    $("jobs").prepend(element);
  }
  return element;
}

function render(job) {
  const element = card(job);
  element.className = `job ${job.status}`;
  element.dataset.status = job.status;
  element.dataset.progress = job.progress;
  element.querySelector(".title").textContent = job.title || job.id;
  element.querySelector(".status").textContent = `${job.status} · ${Math.round(job.progress)} %`;
  element.querySelector(".bar > div").style.width = `${job.progress}%`;
  element.querySelector(".counts").textContent =
    `${job.completed_tasks} of ${job.total_tasks} tasks done` +
    (job.failed_tasks ? `, ${job.failed_tasks} failed` : "") + (job.error ? ` — ${job.error}` : "");
  if (job.artifacts) renderFiles(element, job.artifacts);
}

function renderFiles(element, artifacts) {
  const files = element.querySelector(".files");
  files.replaceChildren();
  for (const artifact of artifacts) {
    if (!artifact.url) continue;
    const row = document.createElement("div");
    row.className = "chapter";
    const label = document.createElement("span");
    if (artifact.kind === "audio") {
      label.textContent = `${artifact.chapter}. ${artifact.title}`;
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = artifact.url;
      row.append(label, audio);
    } else {
      const link = document.createElement("a");
      link.href = artifact.url;
      link.textContent = `The whole package (${artifact.kind.toUpperCase()})`;
      label.append(link);
      row.append(label);
    }
    files.append(row);
  }
}

// Server-Sent Events over fetch(): EventSource cannot send a token. Resumes
// with Last-Event-ID after a dropped connection.
async function follow(job) {
  if (state.streams.has(job.id) || ["completed", "failed", "cancelled"].includes(job.status)) return;
  const controller = new AbortController();
  state.streams.set(job.id, controller);
  let lastId = null;
  try {
    for (;;) {
      let finished = false;
      try {
        const headers = { Authorization: `Bearer ${state.token}` };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(`/v1/jobs/${job.id}/events`, { headers, signal: controller.signal });
        if (!response.ok) return;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = { id: null, data: "" };
            for (const line of block.split("\n")) {
              if (line.startsWith("id: ")) event.id = line.slice(4);
              else if (line.startsWith("data: ")) event.data += line.slice(6);
            }
            if (!event.data) continue;
            lastId = event.id;
            const update = JSON.parse(event.data);
            render(update);
            if (["completed", "failed", "cancelled"].includes(update.status)) {
              finished = true;
              render(await api(`/v1/jobs/${job.id}`));
            }
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      if (finished) return;
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  } finally {
    state.streams.delete(job.id);
  }
}

async function loadJobs() {
  try {
    const page = await api("/v1/jobs?limit=50");
    $("jobs").dataset.loaded = "true";
    for (const job of page.jobs.slice().reverse()) {
      render(job);
      if (["completed", "failed"].includes(job.status)) render(await api(`/v1/jobs/${job.id}`));
      else follow(job);
    }
  } catch (e) {
    $("message").textContent = e.message;
  }
}

// A link may carry the token in its fragment (#token=...), which never
// reaches a server; it is taken and removed from the address bar.
function tokenFromLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname);
  return token;
}

$("use-token").addEventListener("click", () => signIn($("token").value.trim()));
$("submit").addEventListener("submit", submit);
window.addEventListener("hashchange", () => {
  const token = tokenFromLink();
  if (token) signIn(token);
});
const saved = tokenFromLink() || localStorage.getItem("pgbroker.token");
if (saved) signIn(saved);
