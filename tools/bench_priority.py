#!/usr/bin/env python3
"""Priority classes under a saturated upstream: python3 tools/bench_priority.py [--seconds 20]

A fake upstream that takes SERVICE seconds per request behind a proxy with
MAX_UPSTREAM_CONCURRENCY=2; a `low` key keeps 8 requests in flight at all times (the upstream is
always saturated), and a second key sends one request at a time. Prints the second key's wait
(its time to answer minus the service time) at p50/p99, with that key `high` and with it `low`
like the batch key (the same class), first come first served (FAIR_QUEUE=0) and fair, to
compare with one request's service time.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
from llm_proxy import SWITCH_INTERVAL, Config, ProxyServer  # noqa: E402

SERVICE = 0.2


class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # (head and body are two writes)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(SERVICE)
        body = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"},
             "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def call(port: int, key: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}",
                                                         "Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200, resp.status
    return time.perf_counter() - started


def run(priority: str, seconds: float, fair: bool) -> list[float]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "keys.json")
    with open(path, "w") as f:
        json.dump({"keys": [
            {"name": "batch", "key": "sk-batch", "priority": "low", "max_tokens": 10**9,
             "refill_tokens": 10**9},
            {"name": "person", "key": "sk-person", "priority": priority, "max_tokens": 10**9,
             "refill_tokens": 10**9}]}, f)
    config = Config(host="127.0.0.1", port=0, keys_file=path, state_db="off",
                    base_api_url=f"http://127.0.0.1:{upstream.server_address[1]}/v1",
                    max_upstream_concurrency=2, upstream_queue_timeout=120, fair_queue=fair,
                    log_format="json")
    proxy = ProxyServer(config, log_stream=open(os.devnull, "w"))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    port = proxy.server_address[1]
    stop = threading.Event()

    def batch():
        while not stop.is_set():
            call(port, "sk-batch")

    workers = [threading.Thread(target=batch, daemon=True) for _ in range(8)]
    for w in workers:
        w.start()
    time.sleep(1.0)  # saturated
    waits = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        waits.append(call(port, "sk-person") - SERVICE)
    stop.set()
    for w in workers:
        w.join(30)
    proxy.shutdown()
    proxy.server_close()
    upstream.shutdown()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    sys.setswitchinterval(SWITCH_INTERVAL)  # (as main() does)
    for priority, fair in (("high", False), ("low", False), ("high", True), ("low", True)):
        waits = sorted(run(priority, args.seconds, fair))
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
        print(f"FAIR_QUEUE={int(fair)} person {priority:<4} vs batch low, upstream 2 slots, service {SERVICE * 1000:.0f}"
              f" ms: {len(waits)} requests, wait p50 {statistics.median(waits) * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
