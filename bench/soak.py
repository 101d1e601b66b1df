"""Soak test: many runs through the HTTP API from concurrent clients; memory growth, errors, queue latency.

    python -m bench.soak                      # 1,000 runs, 8 clients -> bench/results/soak.json
    python -m bench.soak --runs 100 --clients 4 --out /tmp/soak.json

A real ``ditgraph serve`` (CPU) runs graphs/shapes-txt2img.json (shapes-dit) at 64x64 with one
step and a fresh seed per run, so every run samples, decodes and saves (the model and prompt
stay cached, as in real use). Each client submits a run, waits for it over HTTP, and submits
the next. Reported: errors (non-2xx answers and runs not ending in success), the server's RSS
after warm-up and at the end, queue latency (submit -> start) and run time percentiles, and
``samples``: RSS and the memo cache's size every 5% of the runs (a plateau, or a leak?).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from bench.harness import Server  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def request(server: Server, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read()[:300].decode(errors="replace")}


def workflow(seed: int, size: int, steps: int) -> dict:
    document = json.loads((ROOT / "graphs" / "shapes-txt2img.json").read_text())
    sampler = next(n for n in document["nodes"].values() if n["type"] == "Sampler")
    sampler["inputs"].update(seed=seed, steps=steps)
    latent = next(n for n in document["nodes"].values() if n["type"] == "EmptyLatent")
    latent["inputs"].update(width=size, height=size)
    return document


def client_loop(server: Server, numbers: list[int], results: list, lock: threading.Lock, size: int, steps: int) -> None:
    while True:
        with lock:
            if not numbers:
                return
            number = numbers.pop()
        status, answer = request(server, "POST", "/api/runs", {"workflow": workflow(number, size, steps)})
        if status != 200:
            results.append({"n": number, "error": f"submit {status}: {answer.get('error')}"})
            continue
        run_id = answer["run_id"]
        while True:
            status, record = request(server, "GET", f"/api/runs/{run_id}")
            if status != 200 or record.get("status") in ("success", "failed", "cancelled"):
                break
            time.sleep(0.5)  # polling harder only competes with the worker for the GIL
        if status != 200 or record.get("status") != "success":
            results.append({"n": number, "error": f"{status}: {record.get('status')} {record.get('error')}"})
            continue
        results.append({"n": number, "queue_latency": record["started"] - record["created"],
                        "run_seconds": record["finished"] - record["started"]})


def sample_memory(server: Server, done: list, samples: list, stop: threading.Event, every: int) -> None:
    """Every ``every`` finished runs: (runs, server RSS, memo cache bytes and entries), to tell a
    plateau (the cache filling to its budget) from a leak."""
    next_at = 0
    while not stop.wait(0.2):
        if len(done) < next_at:
            continue
        status, answer = request(server, "GET", "/api/status")
        memo = answer.get("memo", {}) if status == 200 else {}
        samples.append({"runs": len(done), "rss_mb": round(rss_bytes(server.process.pid) / 2**20, 1),
                        "memo_mb": round(memo.get("bytes", 0) / 2**20, 1), "memo_entries": memo.get("entries")})
        next_at = len(done) + every


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def soak(runs: int, clients: int, warmup: int, size: int, steps: int, cache: str | None = None) -> dict:
    load_before = os.getloadavg()  # the machine may be shared: its load explains slow latencies
    with tempfile.TemporaryDirectory(prefix="ditgraph-soak-") as tmp:
        server = Server(Path(tmp), ("--cache", cache) if cache else ())
        try:
            server.wait_ready()
            lock, results = threading.Lock(), []
            numbers = list(range(warmup))
            phase(server, numbers, results, lock, clients, size, steps)  # loads the model, fills caches
            rss_after_warmup = rss_bytes(server.process.pid)
            results.clear()
            numbers = list(range(warmup, warmup + runs))
            samples, stop = [], threading.Event()
            sampler = threading.Thread(target=sample_memory, args=(server, results, samples, stop, max(1, runs // 20)))
            started = time.perf_counter()
            sampler.start()
            phase(server, numbers, results, lock, clients, size, steps)
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
            rss_end = rss_bytes(server.process.pid)
            memo = request(server, "GET", "/api/status")[1].get("memo", {})
        finally:
            server.stop()
    ok = [r for r in results if "error" not in r]
    latency = [r["queue_latency"] for r in ok]
    run_seconds = [r["run_seconds"] for r in ok]
    return {
        "runs": runs, "clients": clients, "warmup_runs": warmup, "size": size, "steps": steps,
        "seconds": round(seconds, 2), "runs_per_second": round(len(ok) / seconds, 3),
        "errors": len(results) - len(ok), "error_samples": [r["error"] for r in results if "error" in r][:5],
        "rss_after_warmup_mb": round(rss_after_warmup / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_mb": round((rss_end - rss_after_warmup) / 2**20, 1),
        "queue_latency_p50_s": percentile(latency, 0.5), "queue_latency_p95_s": percentile(latency, 0.95),
        "run_seconds_p50": percentile(run_seconds, 0.5), "run_seconds_p95": percentile(run_seconds, 0.95),
        "memo_end": {k: memo.get(k) for k in ("policy", "entries", "bytes", "ram_bytes", "max_bytes", "versions",
                                              "evictions", "superseded", "hits", "misses")},
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "samples": samples,
    }


def phase(server: Server, numbers: list[int], results: list, lock: threading.Lock, clients: int, size: int,
          steps: int) -> None:
    threads = [threading.Thread(target=client_loop, args=(server, numbers, results, lock, size, steps))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cache", default=None, help="the server's memo cache policy (ditgraph serve --cache)")
    parser.add_argument("--out", help="result file (default bench/results/soak.json)")
    args = parser.parse_args()
    result = soak(args.runs, args.clients, args.warmup, args.size, args.steps, args.cache)
    result["cache"] = args.cache or "lru (default)"
    path = write_result("soak", result, args.out)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
