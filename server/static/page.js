// The page at /: draw a digit (pointer events: mouse, pen or finger) or choose an image file;
// it is classified by POST /v1/classify when a stroke ends or a file is chosen. No libraries.
"use strict";
(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const digitEl = document.getElementById("digit");
  const confidenceEl = document.getElementById("confidence");
  const barsEl = document.getElementById("bars");
  const seen = document.getElementById("seen");
  const rttEl = document.getElementById("rtt");
  const statusEl = document.getElementById("status");
  const fileEl = document.getElementById("file");
  const tokenEl = document.getElementById("token");
  const needsToken = document.querySelector('meta[name="mnist-edge-auth"]').content === "bearer";
  const PEN = pad.width / 10; // a tenth of the pad: strokes as thick as MNIST's
  let inked = false;
  let drawing = null; // the pointer drawing now, and where it was
  let sequence = 0; // answers to older requests are dropped

  if (needsToken) {
    document.getElementById("auth").hidden = false;
    tokenEl.value = sessionStorage.getItem("mnist-edge-token") || "";
    tokenEl.addEventListener("change", () => sessionStorage.setItem("mnist-edge-token", tokenEl.value.trim()));
    document.getElementById("auth").addEventListener("submit", (e) => e.preventDefault());
  }

  const bars = [];
  for (let d = 0; d < 10; d++) {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.testid = "bar-" + d;
    row.innerHTML = '<span class="label">' + d + '</span><span class="track"><span class="fill"></span></span><span class="pct"></span>';
    barsEl.appendChild(row);
    bars.push(row);
  }

  function blank() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    inked = false;
  }

  function showAnswer(p, ms) {
    digitEl.textContent = String(p.digit);
    confidenceEl.textContent = (100 * p.confidence).toFixed(1) + "% sure";
    p.probabilities.forEach((v, d) => {
      bars[d].classList.toggle("top", d === p.digit);
      bars[d].querySelector(".fill").style.width = (100 * v).toFixed(1) + "%";
      bars[d].querySelector(".pct").textContent = (100 * v).toFixed(1) + "%";
    });
    const raw = atob(p.normalized_image);
    const img = ctx.createImageData(28, 28);
    for (let i = 0; i < 784; i++) {
      const v = raw.charCodeAt(i);
      img.data.set([v, v, v, 255], 4 * i);
    }
    seen.getContext("2d").putImageData(img, 0, 0);
    rttEl.textContent = ms.toFixed(1) + " ms";
    statusEl.textContent = "";
  }

  function clearAnswer() {
    digitEl.textContent = "";
    confidenceEl.textContent = "";
    bars.forEach((b) => {
      b.classList.remove("top");
      b.querySelector(".fill").style.width = "0";
      b.querySelector(".pct").textContent = "";
    });
    seen.getContext("2d").clearRect(0, 0, 28, 28);
    rttEl.textContent = "-";
    statusEl.textContent = "";
  }

  function toBase64(buffer) {
    const bytes = new Uint8Array(buffer);
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  async function classify(buffer) {
    const mine = ++sequence;
    const headers = { "Content-Type": "application/json" };
    if (needsToken) {
      const token = tokenEl.value.trim();
      if (!token) {
        statusEl.textContent = "This server needs a token: enter it above, then draw again.";
        tokenEl.focus();
        return;
      }
      headers.Authorization = "Bearer " + token;
    }
    const body = JSON.stringify({ images: [{ encoded: toBase64(buffer) }], return_normalized_image: true });
    const started = performance.now();
    let answer;
    try {
      const response = await fetch("v1/classify", { method: "POST", headers, body });
      answer = await response.json();
      if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
    } catch (err) {
      if (mine === sequence) statusEl.textContent = "Not classified: " + err.message;
      return;
    }
    const ms = performance.now() - started;
    if (mine !== sequence) return;
    const p = answer.predictions[0];
    if (p.error) {
      digitEl.textContent = "";
      statusEl.textContent = p.error;
      return;
    }
    showAnswer(p, ms);
  }

  function classifyPad() {
    if (!inked) return; // never for a blank pad
    pad.toBlob((blob) => blob.arrayBuffer().then(classify), "image/png");
  }

  function point(e) {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left) * (pad.width / r.width), (e.clientY - r.top) * (pad.height / r.height)];
  }

  function line(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = PEN;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
    inked = true;
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    pad.setPointerCapture(e.pointerId);
    drawing = { id: e.pointerId, at: point(e) };
    line(drawing.at, drawing.at);
    e.preventDefault();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing || e.pointerId !== drawing.id) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const c of events.length ? events : [e]) {
      const to = point(c);
      line(drawing.at, to);
      drawing.at = to;
    }
  });
  function strokeEnd(e) {
    if (!drawing || e.pointerId !== drawing.id) return;
    drawing = null;
    classifyPad();
  }
  pad.addEventListener("pointerup", strokeEnd);
  pad.addEventListener("pointercancel", strokeEnd);

  document.getElementById("clear").addEventListener("click", () => {
    sequence++;
    blank();
    clearAnswer();
    fileEl.value = "";
  });

  async function useFile(file) {
    if (!file) return;
    const buffer = await file.arrayBuffer();
    blank();
    try { // a preview on the pad where the browser can decode it (it cannot decode PGM)
      const bitmap = await createImageBitmap(new Blob([buffer]));
      const s = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
      ctx.drawImage(bitmap, (pad.width - bitmap.width * s) / 2, (pad.height - bitmap.height * s) / 2, bitmap.width * s, bitmap.height * s);
    } catch (err) {
      // no preview; the server still decodes it
    }
    classify(buffer);
  }
  fileEl.addEventListener("change", () => useFile(fileEl.files[0]));
  pad.addEventListener("dragover", (e) => { e.preventDefault(); pad.classList.add("over"); });
  pad.addEventListener("dragleave", () => pad.classList.remove("over"));
  pad.addEventListener("drop", (e) => {
    e.preventDefault();
    pad.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });

  blank();
})();
