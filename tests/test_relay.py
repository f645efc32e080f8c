"""The stream relay: one thread that relays every stream body (STREAM_RELAY=loop).

Streams elsewhere in the tests go through it too (it is the default); these are what only it
has to get right: many streams interleaved in one loop, a slow reader held at a bounded
buffer while the others go on, framing read from pieces split anywhere, and the connection
handed back to the pool only when its body ended where its framing said. The relay by
threads (STREAM_RELAY=threads) runs the forwarding tests' streams again at the end.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import unittest

import llm_proxy
from llm_proxy import AnthropicMeter, BodyReader, Config, OllamaMeter, ProxyServer, UsageMeter

from tests.support import (
    CLIENT_KEY, FLOOD_EVENTS, ProxyTestCase, WAIT, flood_event, ollama_lines, sse_events,
    stream_events, usage_of, wait_until)
from tests.test_forwarding import ForwardingTests


class BodyReaderTests(unittest.TestCase):
    """An upstream body decoded from pieces cut anywhere."""

    BODY = (b"5\r\nHello\r\n"
            b"0006;ext=\"a;b\"\r\n world\r\n"
            b"1A\r\n" + b"z" * 26 + b"\r\n"
            b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n")
    DATA = b"Hello world" + b"z" * 26

    def test_every_split_gives_the_same_data_and_end(self):
        for cut in range(1, len(self.BODY)):
            for tail in (b"", b"HTTP/1.1 200 OK\r\n"):
                with self.subTest(cut=cut, tail=tail):
                    reader = BodyReader(True, None)
                    data = reader.feed(self.BODY[:cut])
                    self.assertFalse(reader.done)
                    data += reader.feed(self.BODY[cut:] + tail)
                    self.assertEqual(data, self.DATA)
                    self.assertTrue(reader.done)
                    self.assertEqual(reader.extra, tail)

    def test_byte_by_byte(self):
        reader = BodyReader(True, None)
        data = b"".join(reader.feed(self.BODY[i:i + 1]) for i in range(len(self.BODY)))
        self.assertEqual((data, reader.done, reader.extra), (self.DATA, True, b""))

    def test_one_whole_chunk_is_recognised_without_decoding(self):
        reader = BodyReader(True, None)
        self.assertEqual(reader.whole_chunk(b"5\r\nHello\r\n"), b"Hello")
        self.assertEqual(reader.whole_chunk(b"0005\r\nHello\r\n"), b"Hello")
        for not_one in (b"0\r\n\r\n", b"5\r\nHello\r\n0\r\n\r\n", b"5;x=1\r\nHello\r\n",
                        b"5\r\nHell", b"6\r\nHello\r\n", b"x\r\nHello\r\n"):
            self.assertIsNone(reader.whole_chunk(not_one), not_one)
        reader.feed(b"5\r\nHel")  # inside a chunk: never
        self.assertIsNone(reader.whole_chunk(b"5\r\nHello\r\n"))

    def test_bad_framing_raises(self):
        for bad in (b"zz\r\nHello\r\n", b"5\r\nHelloXX", b"-5\r\nHello\r\n", b"0x5\r\nHello\r\n",
                    b"5" * (llm_proxy.MAX_CHUNK_LINE + 2)):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    BodyReader(True, None).feed(bad)

    def test_sized_and_unsized_bodies(self):
        reader = BodyReader(False, 10)
        self.assertEqual(reader.feed(b"12345"), b"12345")
        self.assertEqual(reader.feed(b"67890extra"), b"67890")
        self.assertEqual((reader.done, reader.extra), (True, b"extra"))
        self.assertTrue(BodyReader(False, 0).done)
        endless = BodyReader(False, None)
        self.assertEqual(endless.feed(b"abc"), b"abc")
        self.assertFalse(endless.done)
        self.assertTrue(endless.ends_with_connection)
        self.assertFalse(BodyReader(True, None).ends_with_connection)


class MeterShortcutTests(unittest.TestCase):
    """The meter reads the usual piece of a stream (one whole event) by a shorter way; it must
    come to what the general way does, byte for byte and token for token."""

    def feed_both(self, make, events):
        """The events fed one by one (by the short ways) and, to compare, all at once to a
        meter that makes no templates (the general way)."""
        one_by_one, all_at_once = make(), make().without_templates()
        out_one = b"".join(one_by_one.feed(e) for e in events) + one_by_one.finish()
        out_all = all_at_once.feed(b"".join(events)) + all_at_once.finish()
        self.assertEqual(out_one, out_all)
        self.assertEqual(one_by_one.cost(7), all_at_once.cost(7))
        self.assertEqual(one_by_one.generated, all_at_once.generated)
        self.assertEqual(one_by_one.failed, all_at_once.failed)
        return out_one, one_by_one

    def test_openai_events_with_usage_stripped(self):
        asked = {"stream_options": {"include_usage": True}, "messages": []}
        events = stream_events("/v1/chat/completions", "m", asked)
        compact = [e.replace(b'", "', b'","').replace(b": ", b":") for e in events]
        tool = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
            "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": None}], "usage": None}
        for spelling in (events, compact,
                         events[:2] + [b"data: " + json.dumps(tool).encode() + b"\n\n"]
                         + events[2:]):
            out, meter = self.feed_both(lambda: UsageMeter(True, strip=True), spelling)
            self.assertNotIn(b'"usage"', out)  # the nulls and the usage chunk the client
            self.assertEqual(meter.usage()[2],  # did not ask for are gone, and counted
                             usage_of("/v1/chat/completions", asked, 3)["total_tokens"])
        out, meter = self.feed_both(lambda: UsageMeter(True), events)
        self.assertEqual(out, b"".join(events))

    def test_events_with_crlf_lines_comments_and_errors(self):
        events = [b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"\\u00e9t\\u00e9\"}}]}\r\n\r\n",
                  b": a comment\n\n", b"event: x\ndata: {\"choices\": []}\n\n",
                  b"data: {\"error\": {\"message\": \"boom\"}}\n\n", b"data: [DONE]\n\n"]
        _, meter = self.feed_both(lambda: UsageMeter(True), events)
        self.assertEqual(meter.generated, len("été".encode()))
        self.assertTrue(meter.failed)

    def test_events_read_by_their_template(self):
        """Pieces of text in the same envelope are read by the template of the first: texts
        with escapes, raw UTF-8 or \\u escapes, quotes that look like JSON, a text equal to
        another field's value; envelopes that change (a finish, a new `created` second)."""
        texts = ["Hello", " wörld\n", 'say "hi", "usage": null}', "fake-a", "\u2603", "",
                 "\\", "tab\there", "x" * 300, "\U0001f600 emoji",
                 "\ud83d"]  # half an emoji: a JavaScript server splits them across events

        def chunk(text, created=1, finish=None, usage=True, raw=False):
            obj = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": created,
                   "model": "fake-a", "choices": [{"index": 0, "delta": {"content": text},
                                                    "finish_reason": finish}]}
            if usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj, ensure_ascii=not raw).encode(
                "utf-8", "surrogatepass") + b"\n\n"
        for raw in (False, True):
            events = [chunk(t, raw=raw) for t in texts]
            events += [chunk(t, created=2, raw=raw) for t in texts]
            events += [chunk("", finish="stop", raw=raw), b"data: [DONE]\n\n"]
            out, meter = self.feed_both(lambda: UsageMeter(True, strip=True), events)
            self.assertEqual(meter.generated, 2 * sum(map(llm_proxy.text_bound, texts)))
            self.assertIsNotNone(meter.template)
            self.assertEqual(meter.templates_made, 2)  # the first text, at created=2 (a finish:
            # never a template, it may be held)
            self.assertNotIn(b'"usage": null}', out.replace(b'\\"usage\\": null}', b""))
        completions = [b"data: " + json.dumps({"id": "c", "object": "text_completion",
                       "choices": [{"text": t, "index": 0, "logprobs": None,
                                    "finish_reason": None}], "model": "m"}).encode() + b"\n\n"
                       for t in texts]
        _, meter = self.feed_both(lambda: UsageMeter(True), completions)
        self.assertEqual(meter.generated, sum(map(llm_proxy.text_bound, texts)))
        self.assertIsNotNone(meter.template)

    def test_a_template_never_reads_what_is_not_a_piece_of_text(self):
        """Events that fit an envelope only in part, or carry more than text, are parsed."""
        base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": "one"}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": "two"}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": None}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": "3", "x": "yz"}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": ["four"]}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": {"a": "bc"}}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": "5"}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}}]
        wire = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        wire.insert(2, wire[1].replace(b'"two"', b'"tw" "o"'))  # two strings: not JSON
        _, meter = self.feed_both(lambda: UsageMeter(True), wire)
        self.assertEqual(meter.generated, len("onetwo3yz") + len("four") + len("bc") + 1)
        self.assertEqual(meter.usage(), (1, 6, 7))

    def test_anthropic_text_deltas(self):
        events = [b"event: content_block_delta\ndata: " + json.dumps(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                                  "text": t}}).encode() + b"\n\n"
                  for t in ("Hel", "lo ", "wörld", '"q"')]
        _, meter = self.feed_both(lambda: AnthropicMeter(True), events)
        self.assertEqual(meter.generated, len('Hello wörld"q"'.encode()))
        self.assertIsNotNone(meter.template)

    def test_ollama_lines(self):
        lines = ollama_lines("/api/chat", "m", {"messages": [{"role": "user", "content": "hi"}]})
        _, meter = self.feed_both(lambda: OllamaMeter(True), lines)
        self.assertIsNotNone(meter.usage())


class StreamRelayTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.restart(token_cost_mode="usage", max_tokens=1_000_000, response_token_reserve=50)

    def stream_request(self, sock, scenario=""):
        body = json.dumps({"model": "fake-a", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: Bearer %s\r\nX-Fake-Scenario: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (CLIENT_KEY.encode(), scenario.encode(), len(body), body))

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=WAIT)
        self.addCleanup(sock.close)
        return sock

    def test_many_streams_at_once_arrive_whole_in_order_and_settled_exactly(self):
        """Forty streams, their events 20 ms apart, interleaved in the one relay: each body
        exactly what the upstream sent (less the usage chunk the proxy asked for), and each
        charge what the upstream reported."""
        count = 40
        bodies: list[bytes | None] = [None] * count

        def one(index):
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1],
                                              timeout=WAIT)
            body = {"model": "fake-a", "stream": True,
                    "messages": [{"role": "user", "content": "hi " * index}]}
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Authorization": f"Bearer {CLIENT_KEY}", "X-Fake-Delay": "0.02"})
            bodies[index] = conn.getresponse().read()
            conn.close()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(self.proxy.streams.relayed, count)
        for index, body in enumerate(bodies):
            request = {"model": "fake-a", "stream": True,
                       "messages": [{"role": "user", "content": "hi " * index}]}
            self.assertEqual(body, b"".join(stream_events("/v1/chat/completions", "fake-a",
                                                          request)), index)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))
        self.assertEqual(len(self.upstream.reported), count)
        self.assertEqual(1_000_000 - self.remaining(), sum(self.upstream.reported))

    def test_a_slow_reader_is_held_at_a_bounded_buffer_and_slows_nobody(self):
        """A client that stops reading a fast stream: the proxy holds at most
        STREAM_OUT_LIMIT for it and stops reading its upstream (which then stops writing once
        the kernel's buffers are full: the flood is larger than they can hold), while another
        stream goes through; once the reader reads again it gets every byte, in order."""
        self.restart(token_cost_mode="request")
        slow = self.connect()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.stream_request(slow, "flood")
        self.assertTrue(wait_until(lambda: self.proxy.streams.paused() == 1))
        limit = llm_proxy.STREAM_OUT_LIMIT + llm_proxy.READ_CHUNK
        self.assertLessEqual(max(self.proxy.streams.held()), limit)
        total = sum(len(flood_event(i)) for i in range(FLOOD_EVENTS))
        written = self.upstream.flood_sent
        status, _, body = self.chat(stream=True)  # another client meanwhile
        self.assertEqual((status, sse_events(body)[-1]), (200, b"[DONE]"))
        self.assertLessEqual(max(self.proxy.streams.held()), limit)
        self.assertLess(written, total)
        self.assertLess(self.upstream.flood_sent, total)
        received = bytearray()
        while not received.endswith(b"0\r\n\r\n"):
            data = slow.recv(1 << 20)
            self.assertTrue(data)
            received += data
        head, _, chunked = bytes(received).partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        reader = BodyReader(True, None)
        events = sse_events(reader.feed(chunked))
        self.assertTrue(reader.done)
        self.assertEqual(len(events), FLOOD_EVENTS + 1)
        for index, event in enumerate(events[:-1]):
            self.assertEqual(b"data: " + event + b"\n\n", flood_event(index), index)

    def test_a_reader_that_never_reads_is_given_up_after_send_timeout(self):
        self.restart(token_cost_mode="request", send_timeout=1)
        slow = self.connect()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.stream_request(slow, "flood")
        self.assertTrue(self.upstream.disconnected.wait(WAIT))  # the upstream is closed
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        self.assertEqual(self.chat()[0], 200)

    def test_a_hang_up_closes_the_upstream_at_once_among_other_streams(self):
        others = [self.connect() for _ in range(5)]
        for sock in others:
            self.stream_request(sock, "endless")
        leaving = self.connect()
        self.stream_request(leaving, "endless")
        self.assertTrue(leaving.recv(65536).startswith(b"HTTP/1.1 200 OK"))
        leaving.close()
        self.assertTrue(self.upstream.disconnected.wait(WAIT))
        self.assertTrue(self.log.wait_for(lambda text: "client closed" in text))
        for sock in others:  # the others go on
            sock.settimeout(WAIT)
            self.assertTrue(sock.recv(65536))

    def test_a_pipelined_request_is_not_a_hang_up(self):
        """A client that sends its next request while a stream is relayed has not gone."""
        sock = self.connect()
        self.stream_request(sock, "gate")
        received = sock.recv(65536)
        self.assertIn(b"data: ", received)
        body = json.dumps({"model": "fake-a", "messages": [{"role": "user", "content": "hi"}]})
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (CLIENT_KEY.encode(), len(body), body.encode()))
        self.upstream.release.set()
        while received.count(b"HTTP/1.1 200 OK") < 2 or not received.endswith(b"}"):
            try:
                data = sock.recv(65536)
            except TimeoutError:
                self.fail(received)
            self.assertTrue(data, received)
            received += data
        self.assertIn(b"data: [DONE]", received)
        self.assertIn(b'"object": "chat.completion"', received)

    def test_odd_but_valid_framing_is_relayed_whole(self):
        status, _, body = self.chat(stream=True, headers={"X-Fake-Scenario": "odd-chunks"})
        self.assertEqual(status, 200)
        asked = {"model": "fake-a", "stream": True, "stream_options": {"include_usage": True},
                 "messages": [{"role": "user", "content": "hi"}]}
        expected = [e for e in stream_events("/v1/chat/completions", "fake-a", asked)
                    if b'"choices": [], "usage"' not in e]
        self.assertEqual(body, b"".join(expected).replace(b', "usage": null', b""))
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        sent = json.loads(self.upstream.requests[0][3])
        self.assertEqual(1_000_000 - self.remaining(),
                         usage_of("/v1/chat/completions", sent, 3)["total_tokens"])

    def test_a_connection_is_reused_only_when_its_body_ended_where_it_said(self):
        for _ in range(2):
            self.assertEqual(self.chat(stream=True)[0], 200)
        self.assertEqual(len({port for _, port in self.upstream.peers}), 1)  # kept alive
        status, _, body = self.chat(stream=True, headers={"X-Fake-Scenario": "after-last-chunk"})
        self.assertEqual((status, sse_events(body)[-1]), (200, b"[DONE]"))
        self.assertEqual(self.chat()[0], 200)
        self.assertEqual(len({port for _, port in self.upstream.peers}), 2)  # not reused
        self.assertEqual(self.upstream.paths().count("/v1/chat/completions"), 4)


class SlowClientTests(ProxyTestCase):
    """Clients on a slow link: the proxy's socket to them gets a small send buffer (32 KiB), so
    what they have not read waits in the relay, as it does for a client across a real network
    (on loopback the kernel would take it all)."""

    def start_proxy(self, **settings):
        class SmallSendBuffer(llm_proxy.ProxyHandler):
            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        config = Config(host="127.0.0.1", port=0, base_api_url=self.upstream.url,
                        state_db="off", **settings)
        proxy = ProxyServer(config, log_stream=self.log, handler=SmallSendBuffer)
        self._serve(proxy)
        return proxy

    def flood(self, events, then="", version="1.1"):
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]),
                                        timeout=WAIT)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/%s\r\nHost: proxy\r\nAuthorization: "
                     b"Bearer %s\r\nX-Fake-Scenario: flood\r\nX-Fake-Events: %d\r\n"
                     b"X-Fake-Then: %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (version.encode(), CLIENT_KEY.encode(), events, then.encode(),
                        len(body), body))
        return sock

    @staticmethod
    def events_in(received):
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        if b"Transfer-Encoding: chunked" in head:
            body = BodyReader(True, None).feed(body)
        return sse_events(body)

    def test_a_steady_slow_reader_is_not_given_up(self):
        """SEND_TIMEOUT bounds each piece held for a client, as it bounds each write of a
        relay by threads: a client that keeps taking what it is sent, slowly, gets the whole
        stream (1.6 MB at about 0.5 MB a second against a SEND_TIMEOUT of 2 s)."""
        self.proxy = self.start_proxy(send_timeout=2)
        sock = self.flood(100)
        received = bytearray()
        while not received.endswith(b"0\r\n\r\n"):
            data = sock.recv(16 * 1024)
            self.assertTrue(data, f"cut after {len(received):,} bytes")
            received += data
            self.upstream.stop.wait(0.03)  # (the pace of a slow link, not a wait for anything)
        events = self.events_in(received)
        self.assertEqual(len(events), 101)
        self.assertEqual(events[-1], b"[DONE]")

    def test_what_was_held_reaches_an_http_1_0_client_when_the_upstream_stalls(self):
        """A body framed by the connection's end (HTTP/1.0) has no error event to end with, but
        what the upstream did send still goes out before the connection closes."""
        self.proxy = self.start_proxy(read_timeout=1)
        sock = self.flood(12, then="stall", version="1.0")
        self.assertTrue(wait_until(lambda: any(self.proxy.streams.held())))
        self.assertTrue(wait_until(lambda: not self.proxy.streams.held()))  # stalled: ended
        received = bytearray()
        while data := sock.recv(65536):
            received += data
        self.assertEqual([b"data: " + e + b"\n\n" for e in self.events_in(received)],
                         [flood_event(i) for i in range(12)])

    def test_the_relay_thread_ends_when_closed_with_streams_running(self):
        sock = self.flood(10 ** 6)
        self.assertTrue(wait_until(lambda: any(self.proxy.streams.held())))
        relay = self.proxy.streams
        closing = threading.Thread(target=relay.close)
        closing.start()
        sock.close()  # the last stream ends
        closing.join(WAIT)
        self.assertFalse(relay.running())


class ThreadedRelayTests(ForwardingTests):
    """STREAM_RELAY=threads: the forwarding tests again, every stream relayed by the thread
    that read its request."""

    def start_proxy(self, **settings):
        settings.setdefault("stream_relay", "threads")
        proxy = super().start_proxy(**settings)
        self.assertIsNone(proxy.streams)
        return proxy


del ForwardingTests  # (run once, in its own module)


if __name__ == "__main__":
    unittest.main()
