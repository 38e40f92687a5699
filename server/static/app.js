// rpiq web client: one page, no build step, no external resources (works offline against the device).
// The answer goes into an ARIA live region (screen readers announce it) and is played as the server's speech.
"use strict";

(() => {
  const KEY_STORAGE = "rpiq-api-key";
  const READY_POLL_MS = 3000; // how often the page asks /readyz until the server is ready
  const DESCRIBE_QUESTION = "Describe this photo.";
  const WARNINGS = {
    dark: "The photo is very dark.",
    overexposed: "The photo is very bright, almost white.",
    low_contrast: "The photo has almost no contrast.",
    blurry: "The photo is blurry.",
  };
  const $ = (id) => document.getElementById(id);
  const ui = {
    photo: $("photo"), photoStatus: $("photo-status"), serverStatus: $("server-status"),
    camera: $("camera"), cameraStart: $("camera-start"), cameraTake: $("camera-take"),
    cameraStop: $("camera-stop"), video: $("camera-video"),
    scene: $("scene"), describe: $("describe"), read: $("read"), ask: $("ask"), listen: $("listen"), question: $("question"),
    answer: $("answer"), error: $("error"), speech: $("speech"), settings: $("settings"), apikey: $("apikey"),
  };
  const actionButtons = [ui.scene, ui.describe, ui.read, ui.ask];
  const ENDPOINTS = { read: "/v1/read", scene: "/v1/scene", describe: "/v1/vqa", ask: "/v1/vqa" };
  const LABELS = { read: "Reading the text", scene: "Describing the scene", describe: "Describing the photo",
                   ask: "Answering" };
  let captured = null; // a Blob taken from the live camera, preferred over the file input
  let stream = null;
  let busy = false;
  let audioUrl = null;
  let lastButton = null; // where focus returns after the API key is entered

  /** Put text in the live region; cleared first so that the same answer twice is announced twice. */
  function announce(text) {
    ui.answer.textContent = "";
    window.setTimeout(() => { ui.answer.textContent = text; }, 50);
  }

  function showError(text) {
    ui.error.textContent = text ? "Error: " + text : "";
  }

  function setBusy(on, label) {
    busy = on;
    ui.answer.setAttribute("aria-busy", on ? "true" : "false");
    for (const b of actionButtons) b.setAttribute("aria-disabled", on ? "true" : "false");
    if (on) ui.answer.textContent = label;
  }

  function apiKey() {
    return ui.apikey.value.trim() || sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function currentImage() {
    if (captured) return captured;
    return ui.photo.files && ui.photo.files.length ? ui.photo.files[0] : null;
  }

  /** Decode the server's base64 WAV, load it into the audio element and play it. */
  function playWav(base64) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
    ui.speech.src = audioUrl;
    ui.speech.hidden = false;
    const playing = ui.speech.play();
    if (playing) playing.catch(() => { /* autoplay refused: the controls are there to play it */ });
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return "The server answered with status " + response.status + ".";
  }

  /** The spoken text of a reply: the read text with its warnings, the scene summary, or the answer. */
  function replyText(kind, body) {
    if (kind === "read") {
      const warnings = ((body.image && body.image.warnings) || []).map((w) => WARNINGS[w]).filter(Boolean);
      return [...warnings, body.text || "I found no readable text in this photo."].join("\n");
    }
    if (kind === "scene") return body.summary || "No answer.";
    return body.answer || "No answer.";
  }

  /** Send the photo to /v1/read, /v1/scene or /v1/vqa with speech, and present the answer. */
  async function send(kind) {
    if (busy) return;
    showError("");
    lastButton = { read: ui.read, scene: ui.scene, describe: ui.describe, ask: ui.ask }[kind];
    const image = currentImage();
    if (!image) {
      showError("Choose or take a photo first.");
      ui.photo.focus();
      return;
    }
    let question = null;
    if (kind === "describe") question = DESCRIBE_QUESTION;
    if (kind === "ask") {
      question = ui.question.value.trim();
      if (!question) {
        showError("Type or speak a question first.");
        ui.question.focus();
        return;
      }
    }
    const form = new FormData();
    form.append("image", image, image.name || "photo.jpg");
    form.append("speak", "true");
    if (question) form.append("question", question);
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    setBusy(true, LABELS[kind] + ", please wait.");
    try {
      const response = await fetch(ENDPOINTS[kind], { method: "POST", headers, body: form });
      if (response.status === 401) {
        setBusy(false);
        announce("No answer.");
        showError("The server needs an API key. Type it in Server settings, then try again.");
        ui.settings.open = true;
        ui.apikey.focus();
        return;
      }
      if (!response.ok) {
        const message = await errorMessage(response);
        setBusy(false);
        announce("No answer.");
        showError(message);
        return;
      }
      const body = await response.json();
      setBusy(false);
      announce(replyText(kind, body));
      if (body.audio && body.audio.base64) playWav(body.audio.base64);
    } catch (e) {
      setBusy(false);
      announce("No answer.");
      showError("Could not reach the server (" + e.message + ").");
    }
  }

  // --- photo: file input (works everywhere) and live camera (secure contexts only) ---

  ui.photo.addEventListener("change", () => {
    captured = null;
    const f = currentImage();
    ui.photoStatus.textContent = f ? "Photo ready: " + (f.name || "camera photo") + "." : "No photo yet.";
  });

  function stopCamera() {
    if (stream) for (const t of stream.getTracks()) t.stop();
    stream = null;
    ui.video.hidden = ui.cameraTake.hidden = ui.cameraStop.hidden = true;
    ui.cameraStart.hidden = false;
  }

  if (window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
    ui.camera.hidden = false;
    ui.cameraStart.addEventListener("click", async () => {
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
        ui.video.srcObject = stream;
        await ui.video.play();
        ui.video.hidden = ui.cameraTake.hidden = ui.cameraStop.hidden = false;
        ui.cameraStart.hidden = true;
        ui.cameraTake.focus();
        ui.photoStatus.textContent = "Camera on. Point it at the object, then press Take photo.";
      } catch (e) {
        stopCamera();
        showError("The camera could not be started (" + e.message + "). Use Take or choose a photo instead.");
      }
    });
    ui.cameraTake.addEventListener("click", () => {
      const canvas = document.createElement("canvas");
      canvas.width = ui.video.videoWidth;
      canvas.height = ui.video.videoHeight;
      canvas.getContext("2d").drawImage(ui.video, 0, 0);
      canvas.toBlob((blob) => {
        captured = blob;
        ui.photoStatus.textContent =
          "Photo taken from the camera. Now choose Describe scene, Describe, Read text or Ask.";
        ui.scene.focus();
      }, "image/jpeg", 0.92);
    });
    ui.cameraStop.addEventListener("click", () => { stopCamera(); ui.cameraStart.focus(); });
  }

  // --- question: typing, or the browser's speech recognition when it has one ---

  const Recognition = window.SpeechRecognition || window.webkitSpeechRecognition;
  if (Recognition) {
    ui.listen.hidden = false;
    ui.listen.addEventListener("click", () => {
      const rec = new Recognition();
      rec.lang = document.documentElement.lang || "en";
      rec.interimResults = false;
      rec.onresult = (event) => {
        ui.question.value = event.results[0][0].transcript;
        $("question-help").textContent = "Heard: " + ui.question.value;
        ui.ask.focus();
      };
      rec.onerror = (event) => showError("Speech recognition failed (" + event.error + "). Please type the question.");
      ui.listen.textContent = "Listening. Speak now.";
      rec.onend = () => { ui.listen.textContent = "Speak question"; };
      rec.start();
    });
  }

  // --- buttons, keys, settings ---

  ui.scene.addEventListener("click", () => send("scene"));
  ui.describe.addEventListener("click", () => send("describe"));
  ui.read.addEventListener("click", () => send("read"));
  ui.ask.addEventListener("click", () => send("ask"));
  ui.question.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); send("ask"); }
  });
  ui.apikey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  ui.apikey.addEventListener("change", () => sessionStorage.setItem(KEY_STORAGE, ui.apikey.value.trim()));
  ui.apikey.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, ui.apikey.value.trim());
      ui.serverStatus.textContent = "API key saved for this tab.";
      (lastButton || ui.read).focus();
    }
  });

  /** Status text, changed only when it changes (a live region re-announces every write). */
  function setStatus(text) {
    if (ui.serverStatus.textContent !== text) ui.serverStatus.textContent = text;
  }

  /** Ask /readyz every few seconds until the server is ready (or says why it cannot be). */
  async function pollReady() {
    let again = true;
    try {
      const r = await fetch("/readyz", { cache: "no-store" });
      const body = await r.json().catch(() => ({}));
      if (r.ok) {
        setStatus("The server is ready.");
        again = false;
      } else if (body.error) {
        setStatus("The server could not load: " + body.error);
        again = false;
      } else {
        setStatus("The server is still loading. Please wait a moment.");
      }
    } catch (e) {
      setStatus("The server cannot be reached. Trying again.");
    }
    if (again) window.setTimeout(pollReady, READY_POLL_MS);
  }
  pollReady();
})();
