"""The live federation page: while a run is on, 127.0.0.1:<live.port> serves a small HTML page and /status (JSON).

The round loop publishes a status document at each step (server/federation.py); the page polls /status each
second and draws it. Loopback only: the status is not authenticated (reach it from elsewhere over `ssh -L`).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class LivePage:
    """An HTTP server on a daemon thread that serves the page and the last published status."""

    def __init__(self, port: int) -> None:
        self._status = b"{}"
        self._lock = threading.Lock()
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] == "/status":
                    self._send(page.status_bytes(), "application/json")
                elif self.path in ("/", "/index.html"):
                    self._send(PAGE.encode(), "text/html; charset=utf-8")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                return  # one line per poll would drown the run's log

        try:
            self.server = ThreadingHTTPServer((HOST, port), Handler)
        except OSError as exc:  # a second run on this machine: any free port, and the log says which
            log.warning("live page: port %d is taken (%s); using a free one", port, exc.strerror)
            self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fedshop-live-page", daemon=True)
        self._thread.start()

    def publish(self, status: dict[str, Any]) -> None:
        """Replace what /status serves."""
        body = json.dumps(status).encode()
        with self._lock:
            self._status = body

    def status_bytes(self) -> bytes:
        """The last published status, as JSON."""
        with self._lock:
            return self._status

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


# What the chart draws per round, when the run's evaluation reports it (classifier and dual-encoder metrics).
METRICS = ("accuracy", "macro_f1", "ndcg@10", "catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first")


def round_point(record: dict[str, Any]) -> dict[str, Any]:
    """One round of results.json as the page's chart and table need it."""
    server = record.get("server") or {}
    return {"round": record["round"], **{k: server.get(k) for k in ("loss", *METRICS)},
            "bytes_down": record.get("bytes_down_total", 0), "bytes_up": record.get("bytes_up_total", 0),
            "epsilon": (record.get("privacy") or {}).get("epsilon",
                                                        (record.get("record_privacy") or {}).get("epsilon_max")),
            "seconds": record.get("seconds")}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedshop: live federation</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:980px}
h1{font-size:20px;margin:0 0 4px} .muted{color:#666} .bar{background:#eee;height:10px;border-radius:5px}
.bar>div{background:#2b7de9;height:10px;border-radius:5px} table{border-collapse:collapse;margin-top:8px}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left} .tiles{display:flex;gap:12px;margin:12px 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px} .tile b{font-size:18px;display:block}
svg text{font-size:11px;fill:#555}
</style></head><body>
<h1 id="title">fedshop</h1>
<div class="muted">status <b id="status">connecting</b> &middot; updated <span id="updated">-</span></div>
<div class="tiles">
<div class="tile">round<b id="round">-</b><span id="phase" class="muted"></span></div>
<div class="tile">ETA<b id="eta">-</b></div>
<div class="tile">merchants connected<b id="connected">-</b></div>
<div class="tile">MB down / up<b id="bytes">-</b></div>
<div class="tile">&epsilon; spent<b id="epsilon">-</b></div>
</div>
<div class="bar"><div id="progress" style="width:0%"></div></div>
<h2 style="font-size:16px">global model on held-out test, per round</h2>
<svg id="chart" width="900" height="260" role="img" aria-label="metrics per round"></svg>
<h2 style="font-size:16px">last round: sampled <span id="nsampled">-</span>, replied <span id="nreplied">-</span>,
dropped <span id="ndropped">-</span></h2>
<table id="dropped"><tr><th>dropped merchant</th><th>reason</th></tr></table>
<script>
const COLORS = {"accuracy": "#2b7de9", "macro_f1": "#e9632b", "ndcg@10": "#2ba84a", "catalog_ndcg@10": "#8e44ad",
                "catalog_mrr": "#c0392b", "catalog_recall@10": "#16a085", "hard_first": "#7f8c8d"};
const $ = id => document.getElementById(id);
function fmtTime(s) { if (s == null) return "-"; s = Math.round(s);
  return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s"; }
function chart(rounds, numRounds) {
  const svg = $("chart"), W = 900, H = 260, L = 40, R = 130, T = 10, B = 30, NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const add = (tag, attrs, text) => { const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]); if (text != null) e.textContent = text; svg.appendChild(e); };
  const maxRound = Math.max(1, numRounds || 0, ...rounds.map(r => r.round));
  const x = r => L + (W - L - R) * r / maxRound, y = v => T + (H - T - B) * (1 - v);
  for (let v = 0; v <= 1.0001; v += 0.25) { add("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eee"});
    add("text", {x: 6, y: y(v) + 4}, v.toFixed(2)); }
  for (const r of rounds) add("text", {x: x(r.round) - 3, y: H - 10}, r.round);
  Object.entries(COLORS).forEach(([key, color], i) => {
    const pts = rounds.filter(r => r[key] != null).map(r => x(r.round) + "," + y(r[key]));
    if (!pts.length) return;
    add("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2, "data-metric": key});
    add("text", {x: W - R + 10, y: T + 14 + 16 * i, style: "fill:" + color}, key); });
}
async function refresh() {
  let s;
  try { s = await (await fetch("status", {cache: "no-store"})).json(); }
  catch (e) { $("status").textContent = "not reachable (run ended?)"; return; }
  $("title").textContent = s.title || "fedshop"; $("status").textContent = s.status || "-";
  $("updated").textContent = new Date().toLocaleTimeString();
  $("round").textContent = (s.round ?? "-") + " / " + (s.num_rounds ?? "-"); $("phase").textContent = s.phase || "";
  $("eta").textContent = fmtTime(s.eta_seconds); $("connected").textContent = s.connected ?? "-";
  $("progress").style.width = (100 * (s.rounds_done || 0) / (s.num_rounds || 1)) + "%";
  const rounds = s.rounds || [], down = rounds.reduce((a, r) => a + r.bytes_down, 0),
    up = rounds.reduce((a, r) => a + r.bytes_up, 0);
  $("bytes").textContent = (down / 1e6).toFixed(1) + " / " + (up / 1e6).toFixed(1);
  $("epsilon").textContent = s.epsilon == null ? "none" : s.epsilon.toFixed(3);
  const last = s.last_round || {};
  $("nsampled").textContent = last.sampled ?? "-"; $("nreplied").textContent = last.replied ?? "-";
  $("ndropped").textContent = (last.dropped || []).length;
  const table = $("dropped"); table.querySelectorAll("tr.row").forEach(r => r.remove());
  for (const d of last.dropped || []) { const tr = table.insertRow(); tr.className = "row";
    tr.insertCell().textContent = d.merchant; tr.insertCell().textContent = d.reason; }
  chart(rounds, s.num_rounds);
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def status(rounds: list[dict[str, Any]], *, title: str, state: str, rnd: int, num_rounds: int, phase: str,
           connected: int, round_seconds: float, epsilon: float | None) -> dict[str, Any]:
    """The status document: progress and ETA, the last round's merchants, every round's metrics and bytes."""
    done = [r for r in rounds if r["round"] >= 1]
    mean = sum(r.get("seconds", 0.0) for r in done) / len(done) if done else None
    remaining = num_rounds - len(done)
    eta = None if mean is None or state != "running" else max(0.0, mean * remaining - round_seconds)
    last = done[-1] if done else {}
    return {"title": title, "status": state, "round": rnd, "num_rounds": num_rounds, "phase": phase,
            "rounds_done": len(done), "eta_seconds": eta, "connected": connected, "epsilon": epsilon,
            "rounds": [round_point(r) for r in rounds],
            "last_round": {"round": last.get("round"), "sampled": len(last.get("sampled", [])),
                           "replied": len(last.get("replied", [])),
                           "dropped": [{"merchant": d.get("merchant"), "reason": d.get("reason")}
                                       for d in last.get("dropped", [])]}}
