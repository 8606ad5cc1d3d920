// The search page: plain JS against the same server's /v1 API (relative URLs, so a reverse proxy may
// mount the app under any prefix). The bearer token, when the server asks for one, stays in this browser.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "heimdex-search-token";
let pending = null; // the last request's controller: a newer search cancels an older one

function headers() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function clock(seconds) {
  const s = Math.max(0, seconds);
  const m = Math.floor(s / 60);
  const rest = (s - m * 60).toFixed(1).padStart(4, "0");
  return `${m}:${rest}`;
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(path, init = {}) {
  if (pending) pending.abort();
  pending = new AbortController();
  const reply = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) }, signal: pending.signal });
  const body = await reply.json().catch(() => ({}));
  if (reply.status === 401) {
    $("auth").hidden = false;
    $("token").focus();
  }
  if (!reply.ok) {
    const err = body.error || {};
    throw new Error(err.message || `The server answered ${reply.status}`);
  }
  return body;
}

function render(hits, took) {
  const list = $("results");
  const template = $("card");
  list.replaceChildren();
  for (const hit of hits) {
    const card = template.content.firstElementChild.cloneNode(true);
    const button = card.querySelector(".hit");
    const img = card.querySelector("img");
    if (hit.thumbnail_url) img.src = hit.thumbnail_url;
    img.alt = `${hit.filename || hit.video_id}, scene ${hit.index}`;
    card.querySelector(".name").textContent = hit.filename || hit.video_id;
    card.querySelector(".name").title = hit.filename || hit.video_id;
    card.querySelector(".time").textContent = `${clock(hit.start_s)} – ${clock(hit.end_s)}`;
    card.querySelector(".score").textContent = hit.score.toFixed(3);
    button.dataset.sceneId = hit.scene_id;
    button.addEventListener("click", () => play(hit, button));
    list.append(card);
  }
  setStatus(hits.length ? `${hits.length} scenes in ${Math.round(took)} ms` : "No matching scenes.");
}

function play(hit, button) {
  if (!hit.video_url) {
    setStatus("This scene's video is not in storage.", true);
    return;
  }
  document.querySelectorAll(".hit.playing").forEach((el) => el.classList.remove("playing"));
  button.classList.add("playing");
  const video = $("video-el");
  video.src = hit.video_url; // a signed URL ending in #t=<scene start>: the browser seeks there itself
  $("player-title").textContent = hit.filename || hit.video_id;
  $("player-time").textContent = `${clock(hit.start_s)} – ${clock(hit.end_s)}`;
  $("player").hidden = false;
  video.play().catch(() => {}); // autoplay may be refused; the controls are there
  $("player").scrollIntoView({ behavior: "smooth", block: "start" });
}

function filters() {
  const params = new URLSearchParams({ limit: "24" });
  const video = $("video").value;
  if (video) params.set("video_id", video);
  return params;
}

async function searchText(query) {
  const params = filters();
  params.set("q", query);
  history.replaceState(null, "", `?${params}`);
  setStatus("Searching…");
  const started = performance.now();
  try {
    const body = await api(`v1/search?${params}`);
    render(body.hits, performance.now() - started);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message, true);
  }
}

async function searchImage(file) {
  const form = new FormData();
  form.append("file", file);
  setStatus(`Searching by ${file.name || "image"}…`);
  const started = performance.now();
  try {
    const body = await api(`v1/search/image?${filters()}`, { method: "POST", body: form });
    render(body.hits, performance.now() - started);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message, true);
  }
}

async function loadVideos() {
  try {
    const reply = await fetch("v1/videos", { headers: headers() });
    if (reply.status === 401) {
      $("auth").hidden = false;
      return;
    }
    if (!reply.ok) return;
    const { videos } = await reply.json();
    const select = $("video");
    select.length = 1;
    for (const v of videos) select.add(new Option(v.filename || v.id, v.id));
    const wanted = new URLSearchParams(location.search).get("video_id");
    if (wanted) select.value = wanted;
  } catch {
    // The filter is optional; search still works without the list.
  }
}

function wire() {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("q").value.trim();
    if (query) searchText(query);
  });
  $("video").addEventListener("change", () => {
    const query = $("q").value.trim();
    if (query) searchText(query);
  });
  $("image").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) searchImage(file);
    event.target.value = "";
  });
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("auth").hidden = true;
    loadVideos();
    const query = $("q").value.trim();
    if (query) searchText(query);
  });
  $("player-close").addEventListener("click", () => {
    const video = $("video-el");
    video.pause();
    video.removeAttribute("src");
    video.load();
    $("player").hidden = true;
  });

  // Dropping a picture anywhere on the page searches by it.
  let depth = 0;
  const drop = $("drop");
  const hasFile = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFile(event)) return;
    depth += 1;
    drop.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.hidden = true;
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    drop.hidden = true;
    const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) searchImage(file);
    else setStatus("Drop an image file (JPEG, PNG, WebP).", true);
  });
}

wire();
loadVideos().then(() => {
  const query = new URLSearchParams(location.search).get("q");
  if (query) {
    $("q").value = query;
    searchText(query);
  }
});
