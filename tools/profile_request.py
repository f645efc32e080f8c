#!/usr/bin/env python3
"""Count the Python work of one plain request: the opcodes a handler thread runs for it, and
the calls, by function. Unlike a timing, the count does not move from run to run, so it shows
what a change to the hot path adds or takes away (the timings are the benchmark's). Opcodes
are not the cost: a chain of map and zip runs fewer of them than a loop and can cost more in
C; tools/instructions_per_request.py counts all of a request's work, C included.

    python3 tools/profile_request.py                 # this checkout: totals and the top 30
    python3 tools/profile_request.py --top 0         # totals only
    python3 tools/profile_request.py --proxy ../old  # another checkout's llm_proxy.py (for a
                                                     # before and after: git worktree add)

The proxy runs in this process (STATE_DB off, request mode) in front of the tests' fake
upstream; one kept-alive connection sends N chat completions, and a tracer set only in the
handler's thread counts each opcode (sys.settrace with f_trace_opcodes).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import os
import sys
import threading
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default=ROOT, help="the folder whose llm_proxy.py to count")
    parser.add_argument("--requests", type=int, default=500, help="requests counted (500)")
    parser.add_argument("--top", type=int, default=30, help="functions listed (30)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.proxy))
    import llm_proxy  # (the one in --proxy)
    sys.path.append(ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tools"))  # (this folder's bench, not --proxy's)
    from bench_llm_proxy import send_plain
    from tests.support import FakeUpstream

    upstream = FakeUpstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    fields = llm_proxy.Config.__dataclass_fields__
    config = llm_proxy.Config(host="127.0.0.1", port=0, base_api_url=upstream.url,
                              max_tokens=10 ** 9,
                              **({"state_db": "off"} if "state_db" in fields else {}))
    server = llm_proxy.ProxyServer(config, log_stream=io.StringIO())
    threading.Thread(target=server.serve_forever, daemon=True).start()

    opcodes: collections.Counter[types.CodeType] = collections.Counter()
    calls: collections.Counter[types.CodeType] = collections.Counter()

    def on_call(frame: types.FrameType, event: str, arg: object) -> object:
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
        return on_opcode

    def on_opcode(frame: types.FrameType, event: str, arg: object) -> object:
        if event == "opcode":
            opcodes[frame.f_code] += 1
        return on_opcode

    handle = llm_proxy.ProxyHandler.handle_one_request

    def traced(self: object) -> None:
        sys.settrace(on_call)
        try:
            handle(self)
        finally:
            sys.settrace(None)

    llm_proxy.ProxyHandler.handle_one_request = traced  # type: ignore[method-assign]
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])

    def run(count: int) -> None:
        send_plain(conn, count, "sk-profile")

    run(50)  # (the first requests make what later ones reuse)
    opcodes.clear()
    calls.clear()
    run(args.requests)
    n = args.requests
    print(f"{os.path.join(os.path.abspath(args.proxy), 'llm_proxy.py')}: "
          f"{sum(opcodes.values()) / n:,.0f} opcodes and {sum(calls.values()) / n:,.0f} Python "
          f"calls per plain request")
    for code, count in opcodes.most_common(args.top):
        print(f"{count / n:8.1f} {calls[code] / n:6.1f}  {code.co_name} "
              f"({os.path.basename(code.co_filename)}:{code.co_firstlineno})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
