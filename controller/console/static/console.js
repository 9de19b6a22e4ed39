// The Zmachine console page, served by `kubectl zmachine open` on 127.0.0.1. It talks to
// that local server's websocket, which forwards to the API server with the user's own
// credentials. Binary frames are terminal bytes; text frames are JSON control messages.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const title = params.get("zmachine") || "zmachine";
  document.getElementById("title").textContent = title;
  document.title = title + " console";
  const banner = document.getElementById("banner");
  const conn = document.getElementById("conn");
  const term = new Terminal({ cursorBlink: true, scrollback: 10000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  window.zmachineTerminal = term; // for tests and the devtools console

  let ws = null;
  let delay = 500;
  const encoder = new TextEncoder();

  function showBanner(text) {
    banner.textContent = text;
    banner.classList.toggle("shown", Boolean(text));
  }

  function sendSize() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    }
  }

  function connect() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onopen = function () {
      conn.textContent = "connected";
      window.zmachineConnects = (window.zmachineConnects || 0) + 1;
      delay = 500;
      sendSize();
    };
    ws.onmessage = function (event) {
      if (typeof event.data === "string") {
        const msg = JSON.parse(event.data);
        if (msg.type === "status") {
          showBanner(msg.state === "Running" ? "" :
            "The VM is " + msg.state + (msg.message ? ": " + msg.message : "") +
            ". The console stays open and resumes when it runs again.");
        } else if (msg.type === "error") {
          showBanner(msg.message);
        }
        return;
      }
      term.write(new Uint8Array(event.data));
    };
    ws.onclose = function (event) {
      conn.textContent = "disconnected; reconnecting";
      if (event.code === 4401 || event.code === 4403 || event.code === 4404) {
        conn.textContent = "closed";
        return; // refused: reconnecting would be refused again
      }
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    };
  }

  term.onData(function (data) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
  });
  term.onResize(sendSize);
  window.addEventListener("resize", function () { fit.fit(); });
  connect();
  term.focus();
})();
