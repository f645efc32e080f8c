"""Usage mode settles exactly what a real server counts (issue 20, item 4).

Where the server reports usage for every answer, that is what is charged; what it leaves out is
estimated, with upper bounds that hold in every script; a plain request whose client leaves
keeps its reservation; a plain answer too long to keep is settled from its tail; a stream the
client did not ask usage for reaches it as it would without the proxy.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import unittest
import unittest.mock

import llm_proxy
from tests.support import (
    ANTHROPIC_HEADERS, ANTHROPIC_SSE_HEADERS, CLIENT_KEY, OLLAMA_JSON, OLLAMA_NDJSON, WAIT,
    ProxyTestCase, fake_prompt_tokens, scenario, wait_until, wire)

#: What every door answers in the "wordy" scenario, and what the server counts it as: long
#: words are few tokens, fewer than characters / 4 (10 here).
WORDY = "Incomprehensibilities, notwithstanding."
WORDY_TOKENS = 3
CHINESE = "统一码联盟的目标是为每种文字提供唯一编码"  # 20 characters, 60 bytes of UTF-8
TIMINGS = {"cache_n": 0, "prompt_n": 9, "prompt_ms": 1.25, "prompt_per_second": 7200.0,
           "predicted_n": 3, "predicted_ms": 12.5, "predicted_per_second": 240.0}


def _compact(value):
    """JSON as llama.cpp's server writes it: compact, UTF-8 unescaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(objects):
    return [b"data: " + _compact(o) + b"\n\n" for o in objects] + [b"data: [DONE]\n\n"]


def _named(events):
    return [b"event: %s\ndata: %s\n\n" % (o["type"].encode(), wire(o)) for o in events]


def _stream(h, content_type, events, total, gate=None):
    """Send `events` as a chunked stream; report `total`; before event `gate`, wait for the
    test's release."""
    h.send_response(200)
    h.send_header("Content-Type", content_type)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    if total is not None:
        h.server.report(total)
    try:
        for index, event in enumerate(events):
            if index == gate:
                h.wfile.flush()
                h.server.release.wait(WAIT)
            h.chunk(event)
        h.wfile.write(b"0\r\n\r\n")
    except OSError:
        h.server.disconnected.set()
        h.close_connection = True


def _openai_chunks(path, request, text, tokens):
    """A chat or completions stream of n answers as llama.cpp's server writes it: compact, one
    usage chunk after each answer's last when usage was asked for (its prompt counted each
    time), `timings` on the last chunk of each answer (the usage chunk when there is one)."""
    prompt = fake_prompt_tokens(request)
    asked = (request.get("stream_options") or {}).get("include_usage") is True
    chat = path == "/v1/chat/completions"
    base = {"id": "chatcmpl-w" if chat else "cmpl-w", "created": 1, "model": "m",
            "system_fingerprint": "b1", "object": "chat.completion.chunk" if chat
            else "text_completion"}
    chunks = []
    for index in range(request.get("n", 1)):
        if chat:
            parts = [({"role": "assistant", "content": None}, None), ({"content": text}, None),
                     ({}, "stop")]
            answer = [{"choices": [{"finish_reason": f, "index": index, "delta": d}], **base}
                      for d, f in parts]
        else:
            answer = [{"choices": [{"text": t, "index": index, "logprobs": None,
                                    "finish_reason": f}], **base}
                      for t, f in ((text, None), ("", "stop"))]
        if asked:
            answer.append({"choices": [], **base, "usage": {
                "completion_tokens": tokens, "prompt_tokens": prompt,
                "total_tokens": prompt + tokens}})
        answer[-1]["timings"] = TIMINGS
        chunks += answer
    # what its counters say: the prompt once (each report repeats it), every answer's tokens
    total = prompt + tokens * request.get("n", 1) if asked else None
    return chunks, total


@scenario("wordy")
def _wordy(h, path, request):
    """Every door answers WORDY (n answers on chat and completions), each counted as
    WORDY_TOKENS tokens, streamed or not, as llama.cpp's server formats it."""
    prompt = fake_prompt_tokens(request)
    stream = request.get("stream") is True or (path.startswith("/api/")
                                              and request.get("stream") is not False)
    total = prompt + WORDY_TOKENS
    if path in ("/v1/chat/completions", "/v1/completions") and stream:
        chunks, total = _openai_chunks(path, request, WORDY, WORDY_TOKENS)
        return _stream(h, "text/event-stream", _sse(chunks), total)
    if path == "/v1/chat/completions":
        answer = {"choices": [{"finish_reason": "stop", "index": 0, "message": {
            "role": "assistant", "content": WORDY}}], "object": "chat.completion"}
    elif path == "/v1/completions":
        answer = {"choices": [{"text": WORDY, "index": 0, "finish_reason": "stop"}],
                  "object": "text_completion"}
    elif path == "/v1/responses":
        usage = {"input_tokens": prompt, "output_tokens": WORDY_TOKENS, "total_tokens": total}
        done = {"type": "response.completed", "response": {"id": "resp_w", "usage": usage}}
        if stream:
            return _stream(h, "text/event-stream", _named([
                {"type": "response.created"},
                {"type": "response.output_text.delta", "delta": WORDY}, done]), total)
        return h.send(200, wire({"id": "resp_w", "object": "response", "output": [
            {"type": "message", "content": [{"type": "output_text", "text": WORDY}]}],
            "usage": usage}), [("Content-Type", "application/json")])
    elif path == "/v1/messages":
        if stream:
            return _stream(h, ANTHROPIC_SSE_HEADERS[0][1], _named([
                {"type": "message_start", "message": {"id": "msg_w", "usage": {
                    "input_tokens": prompt, "output_tokens": 0}}},
                {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "text_delta", "text": WORDY}},
                {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                 "usage": {"output_tokens": WORDY_TOKENS}},
                {"type": "message_stop"}]), total)
        h.server.report(total)
        return h.send(200, wire({"id": "msg_w", "type": "message", "content": [
            {"type": "text", "text": WORDY}], "usage": {
                "input_tokens": prompt, "output_tokens": WORDY_TOKENS}}), ANTHROPIC_HEADERS)
    else:  # /api/chat
        last = {"model": "m", "message": {"role": "assistant", "content": "" if stream
                                          else WORDY}, "done": True,
                "prompt_eval_count": prompt, "eval_count": WORDY_TOKENS}
        if stream:
            first = {"model": "m", "message": {"role": "assistant", "content": WORDY},
                     "done": False}
            return _stream(h, OLLAMA_NDJSON, [wire(first) + b"\n", wire(last) + b"\n"], total)
        h.server.report(total)
        return h.send(200, wire(last), [("Content-Type", OLLAMA_JSON)])
    h.server.report(total)
    h.json(200, {"id": "w", "created": 1, "model": "m", **answer, "usage": {
        "prompt_tokens": prompt, "completion_tokens": WORDY_TOKENS, "total_tokens": total},
        "timings": TIMINGS})


@scenario("wordy-reset")
def _wordy_reset(h, path, request):
    """A wordy chat stream whose connection is reset after the answer's last chunk, before
    its usage chunk."""
    chunks, _ = _openai_chunks(path, request, WORDY, WORDY_TOKENS)
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for chunk in chunks[:3]:  # the role, the text, the last chunk
        h.chunk(b"data: " + _compact(chunk) + b"\n\n")
    h.wfile.flush()
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.rfile.close()
    h.connection.close()
    h.close_connection = True


@scenario("slow-plain")
def _slow_plain(h, path, request):
    """A plain chat answer that comes only once the test releases it (generation takes
    time: the client may leave before)."""
    h.server.release.wait(WAIT)
    _wordy(h, path, request)


@scenario("chinese-gate")
def _chinese_gate(h, path, request):
    """A chat stream of CHINESE in five pieces, then (held until the test's release) its last
    chunk and its usage: one token a character, as real tokenizers count Chinese."""
    prompt = fake_prompt_tokens(request) + len(json.dumps(request.get("messages"),
                                                          ensure_ascii=False))
    base = {"id": "chatcmpl-c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    pieces = [CHINESE] * 5
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": p},
                                    "finish_reason": None}]} for p in pieces]
    tokens = sum(len(p) for p in pieces)
    chunks += [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                                  "completion_tokens": tokens,
                                                  "total_tokens": prompt + tokens}}]
    _stream(h, "text/event-stream", _sse(chunks), prompt + tokens, gate=len(pieces))


@scenario("logprobs")
def _logprobs(h, path, request):
    """A plain chat answer with logprobs and 20 top_logprobs a token (about 1 KB a token, as
    llama.cpp and vLLM write them), usage at its end."""
    count = 300
    content = [{"token": f" w{i}", "logprob": -0.5, "bytes": [32, 119], "top_logprobs": [
        {"token": f" alt{j}", "logprob": -1.0 - j, "bytes": [32, 97]} for j in range(20)]}
        for i in range(count)]
    prompt = fake_prompt_tokens(request)
    h.server.report(prompt + count)
    h.json(200, {"id": "chatcmpl-l", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(
                     c["token"] for c in content)}, "logprobs": {"content": content},
                     "finish_reason": "length"}],
                 "usage": {"prompt_tokens": prompt, "completion_tokens": count,
                           "total_tokens": prompt + count}})


class SettleExactlyTests(ProxyTestCase):
    """Charged equals what the server counts, on every door, streamed or not."""

    CAPACITY = 100_000

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=self.CAPACITY,
                     response_token_reserve=50)

    def charged_for(self, path, body, scenario_name, count=1):
        before = self.remaining()
        status, _, answer = self.request("POST", path, body,
                                         headers={"X-Fake-Scenario": scenario_name})
        self.assertEqual(status, 200, answer)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))
        return before - self.remaining(), answer

    def test_a_single_answer_is_charged_what_the_server_counts_on_every_door(self):
        """The server counts fewer tokens than characters / 4 of the text: that count, not
        the text's, is what is charged."""
        doors = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                 ("/v1/completions", {"prompt": "hi"}),
                 ("/v1/responses", {"input": "hi"}),
                 ("/v1/messages", {"max_tokens": 20,
                                   "messages": [{"role": "user", "content": "hi"}]}),
                 ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}))
        count = 0
        for path, fields in doors:
            for stream in (False, True):
                with self.subTest(path=path, stream=stream):
                    count += 1
                    charged, _ = self.charged_for(path, {"model": "m", "stream": stream,
                                                         **fields}, "wordy", count)
                    self.assertEqual(charged, self.upstream.reported[-1])

    def test_n_streamed_is_charged_its_prompt_once_and_every_answer(self):
        """llama.cpp's usage chunks repeat the prompt in each answer's report; its counters
        (prompt_tokens_total) count it once: 221 was charged where the server counted 125."""
        body = {"model": "m", "n": 3, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        charged, answer = self.charged_for("/v1/chat/completions", body, "wordy")
        self.assertEqual(charged, self.upstream.reported[-1])
        self.assertNotIn(b'"usage"', answer)

    def cut_before_usage(self, body):
        """Stream `body` ("chinese-gate"), read the whole answer, leave before its usage:
        what was charged."""
        before = self.remaining()
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {CLIENT_KEY}",
                      "X-Fake-Scenario": "chinese-gate"})
        resp = conn.getresponse()
        seen = b""
        while seen.count(CHINESE.encode()) < 5:
            line = resp.readline()
            self.assertTrue(line)
            seen += line
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.upstream.release.set()
        return before - self.remaining()

    def test_a_stream_cut_before_its_usage_is_charged_an_upper_bound_in_every_script(self):
        """The client has the whole Chinese answer and leaves before its usage: the estimate
        counts at least a token a character, the prompt too."""
        question = "请用中文详细解释统一码的历史" * 10
        body = {"model": "m", "stream": True, "messages": [{"role": "user",
                                                           "content": question}]}
        charged = self.cut_before_usage(body)
        self.assertGreaterEqual(charged, self.upstream.reported[-1])
        self.assertGreaterEqual(charged, len(question) + 5 * len(CHINESE))
        self.assertEqual(charged, llm_proxy.prompt_estimate(body)
                         + 5 * len(CHINESE.encode()))

    def test_the_estimate_of_a_cut_stream_never_passes_its_output_limit(self):
        """The server stops at max_tokens: the text's bound is capped there."""
        body = {"model": "m", "stream": True, "max_tokens": 40,
                "messages": [{"role": "user", "content": "统一码"}]}
        self.assertEqual(self.cut_before_usage(body), llm_proxy.prompt_estimate(body) + 40)

    def test_a_plain_request_whose_client_leaves_keeps_its_reservation(self):
        """llama.cpp's server runs a plain request to its end after its client has gone:
        the key pays what it reserved, not the prompt alone."""
        body = {"model": "m", "max_tokens": 400,
                "messages": [{"role": "user", "content": "write at length"}]}
        before = self.remaining()
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                        timeout=WAIT)
        self.addCleanup(sock.close)
        data = json.dumps(body).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
                     b"X-Fake-Scenario: slow-plain\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) == 1))
        sock.close()
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.upstream.release.set()
        self.assertEqual(before - self.remaining(), llm_proxy.prompt_estimate(body) + 400)

    def test_a_plain_answer_too_long_to_keep_is_settled_from_its_tail(self):
        """An answer with top_logprobs (about 1 KB a token) passes MAX_METERED_BODY: its
        usage is read from its end, not its reservation kept."""
        body = {"model": "m", "max_tokens": 300, "logprobs": True, "top_logprobs": 20,
                "messages": [{"role": "user", "content": "count"}]}
        with unittest.mock.patch.object(llm_proxy, "MAX_METERED_BODY", 64 * 1024):
            charged, answer = self.charged_for("/v1/chat/completions", body, "logprobs")
        self.assertGreater(len(answer), 4 * 64 * 1024)
        self.assertEqual(charged, self.upstream.reported[-1])
        self.assertNotEqual(charged, llm_proxy.prompt_estimate(body) + 300)


class SameBytesTests(ProxyTestCase):
    """In usage mode a stream that did not ask for usage reaches the client byte for byte as
    the server sends it without the proxy (llama.cpp's timings included)."""

    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=100_000, response_token_reserve=50)

    def direct(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", path, json.dumps(body), {"X-Fake-Scenario": "wordy"})
        return conn.getresponse().read()

    def test_timings_reach_the_client_where_the_server_puts_them(self):
        for path, fields in (("/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}]}),
                             ("/v1/completions", {"prompt": "hi"}),
                             ("/v1/chat/completions",
                              {"n": 2, "messages": [{"role": "user", "content": "hi"}]})):
            with self.subTest(path=path, **{k: v for k, v in fields.items() if k == "n"}):
                body = {"model": "m", "stream": True, **fields}
                before = self.remaining()
                _, _, through = self.request("POST", path, body,
                                             headers={"X-Fake-Scenario": "wordy"})
                self.assertTrue(self.log.wait_for(
                    lambda text: text.count(" cost=") >= len(self.upstream.reported)))
                charged = before - self.remaining()
                reported = self.upstream.reported[-1]
                alone = self.direct(path, body)
                self.assertIn(b'"timings"', alone)
                self.assertEqual(through, alone)
                self.assertEqual(charged, reported)


    def test_an_answers_last_chunk_held_back_reaches_the_client_when_the_stream_breaks(self):
        """The last chunk waits for the usage chunk that may carry its timings; when the
        stream breaks instead, it still goes out, before the error event."""
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        _, _, answer = self.request("POST", "/v1/chat/completions", body,
                                    headers={"X-Fake-Scenario": "wordy-reset"})
        last, _, error = answer.partition(b'data: {"error"')
        self.assertTrue(error)
        self.assertIn(b'"finish_reason":"stop"', last)


class UpperBoundTests(unittest.TestCase):
    """The estimates, table-driven: never below what a byte-level tokenizer can make of the
    text (a token is at least one byte)."""

    TEXTS = ("hello world", "0123456789" * 3, "x" * 40, "统一码联盟", "Ünïcödé façade",
             "emoji 🎉🎉🎉", "кириллица и латиница", "ﷺ", "\ud800 lone")

    def test_the_prompt_estimate_is_at_least_the_bytes_of_every_string(self):
        for text in self.TEXTS:
            with self.subTest(text=text):
                body = {"model": "m", "messages": [{"role": "user", "content": text}]}
                self.assertGreaterEqual(llm_proxy.prompt_estimate(body),
                                        len(text.encode("utf-8", "surrogatepass")))
                self.assertGreaterEqual(llm_proxy.prompt_estimate(body), len(text))

    def test_a_cut_anthropic_stream_counts_its_prompt_and_bounds_its_text(self):
        meter = llm_proxy.AnthropicMeter(True)
        events = [{"type": "message_start", "message": {"usage": {"input_tokens": 10,
                                                                  "output_tokens": 0}}},
                  {"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": CHINESE}}]
        for event in events:
            meter.feed(b"event: x\ndata: " + wire(event) + b"\n\n")
        self.assertEqual(meter.cost(999), (10, 60, 70))

    def test_the_usage_of_several_answers_covers_those_that_ended_before_it(self):
        """vLLM sends one usage chunk after every answer ended: it covers them all. llama.cpp
        sends one after each: a stream cut after the first covers only the first."""
        def chunk(index, text, finish=None):
            return {"choices": [{"index": index, "delta": {"content": text},
                                 "finish_reason": finish}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                          "total_tokens": 6}}
        for name, events, cost in (
                ("vllm", [chunk(0, "x" * 40), chunk(1, "y" * 40), chunk(0, "", "stop"),
                          chunk(1, "", "stop"), usage], (4, 2, 6)),
                ("llama.cpp cut", [chunk(0, "x" * 40), chunk(1, "y" * 40),
                                   chunk(0, "", "stop"), usage], (9, 80, 89))):
            with self.subTest(name):
                meter = llm_proxy.UsageMeter(True, strip=True)
                meter.answers = 2
                for event in events:
                    meter.feed(b"data: " + json.dumps(event).encode() + b"\n\n")
                meter.finish()
                self.assertEqual(meter.cost(9), cost)

    def test_a_held_last_chunk_keeps_its_place_before_bytes_that_are_not_events(self):
        meter = llm_proxy.UsageMeter(True, strip=True)
        last = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        junk = b"x" * (llm_proxy.MAX_PENDING_EVENT + 1)
        self.assertEqual(meter.feed(last) + meter.feed(junk) + meter.finish(), last + junk)

    def test_what_a_server_did_not_count_is_prorated_and_bounded(self):
        self.assertEqual(llm_proxy.prorated(2, 8, 22), 6)   # its own rate: 2 tokens in 8 bytes
        self.assertEqual(llm_proxy.prorated(9, 8, 22), 22)  # never above the bound
        self.assertEqual(llm_proxy.prorated(0, 0, 22), 22)  # nothing measured: the bound


if __name__ == "__main__":
    unittest.main()
