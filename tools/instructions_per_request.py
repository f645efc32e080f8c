#!/usr/bin/env python3
"""Count the instructions the proxy's process runs for one plain request, with valgrind's
callgrind: all of its work (Python and C, every thread), which does not move from run to run
as a timing does (within about 0.5 %). The opcode count of tools/profile_request.py says
which Python functions run; this one says what they cost, C included (a chain of map and zip
runs fewer opcodes than a loop and can cost three times as much).

    python3 tools/instructions_per_request.py                 # this checkout
    python3 tools/instructions_per_request.py --proxy ../old  # another checkout's llm_proxy.py

The proxy runs under valgrind (STATE_DB off, request mode) in front of the benchmark's fake
upstream; one kept-alive connection sends the two counts of chat completions, and the
difference of the two totals, over the difference of the counts, is one request's work
(start-up and shutdown cancel out). Needs valgrind (apt-get install valgrind); about two
minutes.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_llm_proxy as bench  # noqa: E402  (the fake upstream and its helpers)


def total_instructions(proxy: str, upstream_port: int, requests: int, folder: str) -> int:
    """The instructions of a proxy process that served `requests` plain requests."""
    port = bench.free_port()
    out = os.path.join(folder, f"callgrind.{requests}")
    env = {"HOST": "127.0.0.1", "PORT": str(port), "STATE_DB": "off",
           "BASE_API_URL": f"http://127.0.0.1:{upstream_port}/v1",
           "MAX_TOKENS": "1000000000", "REFILL_TOKENS": "1000000000"}
    # (--trace-children: the script starts again as a module, with exec; its log goes to a
    # file, as bench.start's do: a pipe left unread would fill and stall it)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--fair-sched=yes",
                             "--trace-children=yes", f"--callgrind-out-file={out}.%p",
                             sys.executable, os.path.join(proxy, "llm_proxy.py")],
                            env={**os.environ, **env}, text=True, stdout=log, stderr=log)
    deadline = time.monotonic() + 600  # (compiling the file is slow under valgrind)
    while True:
        log.seek(0)
        if "listening on" in log.read():
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the proxy in {proxy} did not start under valgrind")
        time.sleep(0.1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    bench.send_plain(conn, requests, "sk-count")
    conn.close()
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    total = 0  # (the process's image before the exec and after it, each its own file)
    for name in os.listdir(folder):
        if name.startswith(os.path.basename(out) + "."):
            with open(os.path.join(folder, name)) as f:
                total += next(int(line.split()[1]) for line in f
                              if line.startswith(("summary:", "totals:")))
            os.unlink(os.path.join(folder, name))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default=ROOT, help="the folder whose llm_proxy.py to count")
    parser.add_argument("--requests", type=int, nargs=2, default=(50, 350), metavar=("FEW", "MANY"),
                        help="the two counts of requests (50 350)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("instructions_per_request: needs valgrind (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    few, many = args.requests
    upstream_port = bench.free_port()
    upstream = bench.start([sys.executable, os.path.join(ROOT, "tools", "bench_llm_proxy.py"),
                            "--serve-upstream", str(upstream_port)], {}, "ready", "stdout")
    try:
        with tempfile.TemporaryDirectory() as folder:
            counts = [total_instructions(os.path.abspath(args.proxy), upstream_port, n, folder)
                      for n in (few, many)]
    finally:
        upstream.terminate()
    print(f"{os.path.join(os.path.abspath(args.proxy), 'llm_proxy.py')}: "
          f"{(counts[1] - counts[0]) / (many - few):,.0f} instructions per plain request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
