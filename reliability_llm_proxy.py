#!/usr/bin/env python3
"""Load, soak, fairness and fuzz runs for llm_proxy (by hand, not part of the unit tests).

    python3 reliability_llm_proxy.py            # everything, about five minutes
    python3 reliability_llm_proxy.py --quick    # the same, shorter (about a minute)
    python3 reliability_llm_proxy.py soak fairness   # some parts only: soak flood fairness fuzz

Everything runs on loopback against the benchmark's asyncio fake upstream, with the proxy as its
own process (its RSS and thread count are read from /proc, Linux). Each part prints its figures
and a verdict; the exit status is 1 if any verdict failed.

  soak      200 concurrent streaming clients for 60 s, plus a burst of 2,000 short requests from
            500 keys that hold 3 tokens each (so 500 must be refused): no unexpected errors,
            upstream count == tokens available, RSS growth < 20 MB, threads back to baseline.
  flood     100,000 requests with random keys (wrk with a Lua script): peak RSS stays bounded.
  fairness  MAX_UPSTREAM_CONCURRENCY=2, a 50 ms upstream; one key keeps 50 requests queued,
            another sends one at a time: the second key's wait, fair queue against FIFO.
  fuzz      random and mutated HTTP requests for 60 s from 4 threads: the proxy never dies and
            answers a normal request after every 200 of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_llm_proxy import free_port, pct, start  # noqa: E402  (the benchmark's helpers)
from llm_proxy import key_digest  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


# ######################################################################### helpers ####

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB), VmHWM (peak kB) and Threads of a process."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                values[name] = int(rest.split()[0])
    return values


def call(port: int, key: str, body: dict, headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                      **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def served(up_port: int, model: str) -> int:
    """How many requests for `model` the fake upstream has answered."""
    conn = http.client.HTTPConnection("127.0.0.1", up_port, timeout=10)
    conn.request("GET", "/v1/_served")
    count = json.loads(conn.getresponse().read()).get(model, 0)
    conn.close()
    return count


class Stack:
    """The fake upstream and one proxy, as processes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.up_port, self.port = free_port(), free_port()
        self.upstream = start([sys.executable, os.path.join(HERE, "bench_llm_proxy.py"),
                               "--serve-upstream", str(self.up_port)], {}, "ready", "stdout")
        self.proxy = start([sys.executable, os.path.join(HERE, "llm_proxy.py")], {
            "HOST": "127.0.0.1", "PORT": str(self.port),
            "BASE_API_URL": f"http://127.0.0.1:{self.up_port}/v1", **env},
            "listening on", "stderr")

    def close(self) -> None:
        for proc in (self.proxy, self.upstream):
            proc.terminate()
            proc.wait(30)


def verdict(ok: bool, text: str) -> bool:
    print(f"  {'PASS' if ok else 'FAIL'}: {text}")
    return ok


# ############################################################################ soak ####

def soak(seconds: int) -> bool:
    print(f"\nsoak: 200 streaming clients for {seconds} s + 2,000 requests from 500 keys")
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "keys.json")
    entries = [{"name": f"stream{i}", "key": f"sk-stream-{i}", "max_tokens": 1_000_000_000,
                "refill_tokens": 1_000_000_000} for i in range(200)]
    entries += [{"name": f"burst{i}", "key": f"sk-burst-{i}", "max_tokens": 3}
                for i in range(500)]
    with open(path, "w") as f:
        json.dump({"keys": entries}, f)
    stack = Stack({"KEYS_FILE": path, "MAX_CONNECTIONS": "1024"})
    try:
        call(stack.port, "sk-stream-0", CHAT)  # warm up
        base = proc_status(stack.proxy.pid)
        errors: list[str] = []
        streams = [0]
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def streamer(index: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            while time.monotonic() < deadline:
                try:
                    status, body = call(stack.port, f"sk-stream-{index}", {**CHAT, "stream": True},
                                        {"X-Bench-Events": "20", "X-Bench-Spacing-Ms": "20"},
                                        conn)
                    if status != 200 or not body.endswith(b"data: [DONE]\n\n"):
                        raise OSError(f"status {status}")
                    with lock:
                        streams[0] += 1
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        errors.append(f"stream: {err!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            conn.close()

        threads = [threading.Thread(target=streamer, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        time.sleep(min(5, seconds / 4))  # the burst lands while the streams run
        outcomes = {"admitted": 0, "limited": 0}

        def burster(keys: list[int]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
            for key in keys:
                for _ in range(4):
                    try:
                        status, body = call(stack.port, f"sk-burst-{key}",
                                            {**CHAT, "model": "burst"}, conn=conn)
                    except (OSError, http.client.HTTPException) as err:
                        with lock:
                            errors.append(f"burst: {err!r}")
                        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
                        continue
                    with lock:
                        if status == 200 and b"limit reached" in body:
                            outcomes["limited"] += 1
                        elif status == 200:
                            outcomes["admitted"] += 1
                        else:
                            errors.append(f"burst: status {status}")
            conn.close()

        bursters = [threading.Thread(target=burster, args=(list(range(i, 500, 25)),))
                    for i in range(25)]
        for t in bursters:
            t.start()
        for t in bursters:
            t.join()
        burst_served = served(stack.up_port, "burst")
        for t in threads:
            t.join()
        time.sleep(1)
        after = proc_status(stack.proxy.pid)
        growth = (after["VmRSS"] - base["VmRSS"]) / 1024
        print(f"  streams completed: {streams[0]}, burst: {outcomes}, errors: {len(errors)}")
        print(f"  RSS {base['VmRSS'] / 1024:.1f} MB -> {after['VmRSS'] / 1024:.1f} MB "
              f"(peak {after['VmHWM'] / 1024:.1f} MB); threads {base['Threads']} -> "
              f"{after['Threads']}")
        ok = verdict(not errors, f"no unexpected errors {errors[:3]}")
        ok &= verdict(outcomes == {"admitted": 1500, "limited": 500},
                      "exact admission: 1,500 of 2,000 burst requests admitted (3 tokens x 500 "
                      "keys)")
        ok &= verdict(burst_served == 1500, f"no over-admission: the upstream served "
                      f"{burst_served} burst requests, the tokens available were 1,500")
        ok &= verdict(growth < 20, f"RSS growth {growth:.1f} MB < 20 MB")
        ok &= verdict(after["Threads"] <= base["Threads"], "threads back to baseline")
        return ok
    finally:
        stack.close()
        shutil.rmtree(tmp)


# ########################################################################### flood ####

def flood(requests: int) -> bool:
    print(f"\nflood: {requests:,} requests, each with a new random key")
    if not shutil.which("wrk"):
        return verdict(False, "wrk is not installed (apt-get install wrk)")
    stack = Stack({})
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f"""
wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(CHAT))}
wrk.headers["Content-Type"] = "application/json"
local sent = 0
request = function()
  sent = sent + 1
  if sent > {requests // 2} then wrk.thread:stop() end
  local key = string.format("sk-%08x%08x", math.random(0, 2^31), math.random(0, 2^31))
  wrk.headers["Authorization"] = "Bearer " .. key
  return wrk.format()
end
""")
    script.close()
    try:
        base = proc_status(stack.proxy.pid)
        out = subprocess.run(["wrk", "-t2", "-c32", "-d120s", "-s", script.name,
                              f"http://127.0.0.1:{stack.port}/v1/chat/completions"],
                             capture_output=True, text=True).stdout
        done = int(out.split(" requests in")[0].split()[-1])
        after = proc_status(stack.proxy.pid)
        print(f"  {done:,} requests; RSS {base['VmRSS'] / 1024:.1f} MB -> "
              f"{after['VmRSS'] / 1024:.1f} MB, peak {after['VmHWM'] / 1024:.1f} MB")
        per_key = (after["VmHWM"] - base["VmRSS"]) * 1024 / max(done, 1)
        print(f"  about {per_key:.0f} bytes per distinct key held (buckets until they refill, "
              "counters, metric series capped at 1,000)")
        ok = verdict(after["VmHWM"] / 1024 < 200, "peak RSS under 200 MB")
        return ok
    finally:
        os.unlink(script.name)
        stack.close()


# ######################################################################## fairness ####

def fairness(seconds: int) -> bool:
    print(f"\nfairness: MAX_UPSTREAM_CONCURRENCY=2, 50 ms upstream, {seconds} s per mode")
    results = {}
    for fair in ("1", "0"):
        stack = Stack({"MAX_UPSTREAM_CONCURRENCY": "2", "FAIR_QUEUE": fair,
                       "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000",
                       "UPSTREAM_QUEUE_TIMEOUT": "120"})
        try:
            stop = threading.Event()
            delay = {"X-Bench-Delay-Ms": "50"}

            def hog() -> None:  # key A keeps about 50 requests queued
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
                while not stop.is_set():
                    call(stack.port, "sk-hog", CHAT, delay, conn)
                conn.close()

            hogs = [threading.Thread(target=hog) for _ in range(50)]
            for t in hogs:
                t.start()
            time.sleep(1)
            waits = []
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                started = time.perf_counter()
                call(stack.port, "sk-polite", CHAT, delay, conn)
                waits.append((time.perf_counter() - started) * 1000 - 50)
            conn.close()
            stop.set()
            for t in hogs:
                t.join()
            results[fair] = waits
            print(f"  {'fair' if fair == '1' else 'FIFO'}: the polite key's wait beyond the 50 ms "
                  f"service: p50 {pct(waits, 50):.0f} ms, p99 {pct(waits, 99):.0f} ms "
                  f"({len(waits)} requests)")
        finally:
            stack.close()
    return verdict(pct(results["1"], 99) <= 75,
                   "with the fair queue the polite key waits at most about one service time "
                   f"(p99 {pct(results['1'], 99):.0f} ms)")


# ############################################################################ fuzz ####

SEEDS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-fuzz\r\n"
    b"Content-Type: application/json\r\nContent-Length: 61\r\n\r\n"
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n",
    b"OPTIONS /v1/chat/completions HTTP/1.1\r\nAccess-Control-Request-Headers: x\r\n\r\n",
    b"GET /health HTTP/1.0\r\n\r\n",
]
TOKENS = [b"\r\n", b"\r\n\r\n", b" ", b":", b"\x00", b"\xff", b"%", b"%2e%2e/", b"//", b"{",
          b"}", b"[" * 50, b"Content-Length: 99999999\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Expect: 100-continue\r\n", b"HTTP/2.0", b"GET", b"\t", b"-1", b"0x10"]


def mutate(rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 6)):
        where = rng.randint(0, len(data))
        action = rng.random()
        if action < 0.4:
            data[where:where] = rng.choice(TOKENS)
        elif action < 0.7 and data:
            del data[where:where + rng.randint(1, 20)]
        elif data:
            data[min(where, len(data) - 1)] = rng.getrandbits(8)
    return bytes(data)


def fuzz(seconds: int) -> bool:
    print(f"\nfuzz: random and mutated requests for {seconds} s")
    stack = Stack({"CLIENT_HEADER_TIMEOUT": "2", "CLIENT_BODY_TIMEOUT": "2",
                   "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000"})
    sent = [0]
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def fuzzer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            data = mutate(rng)
            try:
                with socket.create_connection(("127.0.0.1", stack.port), timeout=3) as sock:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
            except OSError:
                pass  # resets and timeouts are fine answers to garbage
            with lock:
                sent[0] += 1
                check = sent[0] % 200 == 0
            if check:
                try:
                    status, _ = call(stack.port, "sk-check", CHAT)
                    if status != 200:
                        raise OSError(f"status {status}")
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        failures.append(repr(err))
    try:
        threads = [threading.Thread(target=fuzzer, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = stack.proxy.poll() is None
        status, _ = call(stack.port, "sk-check", CHAT) if alive else (0, b"")
        print(f"  {sent[0]:,} fuzzed requests; normal requests failing between them: "
              f"{len(failures)}")
        ok = verdict(alive and status == 200, "the proxy is alive and answers afterwards")
        ok &= verdict(not failures, f"every check request in between succeeded {failures[:3]}")
        return ok
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["soak", "flood", "fairness", "fuzz"])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args(argv)
    quick = args.quick
    runs = {"soak": lambda: soak(15 if quick else 60),
            "flood": lambda: flood(20_000 if quick else 100_000),
            "fairness": lambda: fairness(5 if quick else 20),
            "fuzz": lambda: fuzz(15 if quick else 60)}
    ok = True
    for part in args.parts:
        ok &= runs[part]()
    print("\nall passed" if ok else "\nsome checks failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
