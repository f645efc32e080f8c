"""The request pipeline's pure pieces, tested without HTTP: the usage meter at every byte
boundary, the charge's transitions, the framing decision, the fair gate's order, and the header
parser against the standard library's."""

from __future__ import annotations

import datetime
import http.client
import io
import json
import random
import threading
import unittest

import llm_proxy
from llm_proxy import (ANSWERED, BROKEN, FAILED, LEFT, NO_ANSWER, NOT_SENT, REFUSED,
                       BucketPolicy,
                       Charge, FairGate, Framing, HeaderError, MemoryBucketStore, UsageMeter,
                       choose_framing, read_headers)
from tests.support import WAIT, FakeClock, completion, stream_events, usage_of, wait_until

CHAT = "/v1/chat/completions"


def feed_in_pieces(meter: UsageMeter, body: bytes, cuts: list[int]) -> bytes:
    """What the meter relays when `body` arrives cut at `cuts`."""
    out = []
    start = 0
    for cut in [*cuts, len(body)]:
        out.append(meter.feed(body[start:cut]))
        start = cut
    return b"".join(out) + meter.finish()


class UsageMeterTests(unittest.TestCase):
    """Each server's stream habits, cut at every byte boundary: what is relayed and what it
    costs must not depend on where the reads break."""

    REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello there"}],
               "prompt": "hello there"}

    def habits(self):
        asked = {**self.REQUEST, "stream_options": {"include_usage": True}}
        for path, habit, request, strip in (
                (CHAT, "", asked, False),                     # the client asked for usage
                (CHAT, "", asked, True),                      # the proxy asked: stripped
                ("/v1/completions", "", asked, True),
                ("/v1/completions", "ollama", asked, True),   # zeroed usage on each chunk
                (CHAT, "llamacpp", self.REQUEST, False),      # usage (+ timings) on the last
                (CHAT, "no-usage", self.REQUEST, False),
                ("/v1/responses", "", self.REQUEST, False)):  # usage in response.completed
            body = b"".join(stream_events(path, "m", request, habit))
            yield f"{path} {habit or 'openai'} strip={strip}", body, strip, path, habit

    def test_every_split_of_every_habit(self):
        for name, body, strip, path, habit in self.habits():
            with self.subTest(name):
                whole = UsageMeter(stream=True, strip=strip)
                expected = feed_in_pieces(whole, body, [])
                cost = whole.cost(5)
                for cut in range(len(body) + 1):
                    meter = UsageMeter(stream=True, strip=strip)
                    self.assertEqual(feed_in_pieces(meter, body, [cut]), expected, cut)
                    self.assertEqual(meter.cost(5), cost, cut)
                byte_by_byte = UsageMeter(stream=True, strip=strip)
                self.assertEqual(feed_in_pieces(byte_by_byte, body, list(range(len(body)))),
                                 expected)
                self.assertEqual(byte_by_byte.cost(5), cost)

    def test_what_each_habit_relays_and_costs(self):
        plain = {**self.REQUEST}
        for name, body, strip, path, habit in self.habits():
            with self.subTest(name):
                meter = UsageMeter(stream=True, strip=strip)
                relayed = feed_in_pieces(meter, body, [])
                if strip:  # byte for byte what the client would get without the proxy
                    self.assertEqual(relayed, b"".join(stream_events(path, "m", plain, habit)))
                else:
                    self.assertEqual(relayed, body)
                reported = usage_of(path, self.REQUEST, completion_tokens=3)["total_tokens"]
                generated = len("Hello world")  # (no usage: the text's bound, its bytes)
                self.assertEqual(meter.cost(5)[2],
                                 5 + generated if habit == "no-usage" else reported)

    def test_a_plain_body_at_every_split(self):
        body = json.dumps(completion(CHAT, "m", self.REQUEST)).encode()
        reported = usage_of(CHAT, self.REQUEST)["total_tokens"]
        for cut in range(len(body) + 1):
            meter = UsageMeter(stream=False)
            self.assertEqual(feed_in_pieces(meter, body, [cut]), body)
            self.assertEqual(meter.cost(5)[2], reported)


class ChargeTests(unittest.TestCase):
    """The charge's transitions as a table: how a request ended -> what it costs."""

    POLICY = BucketPolicy(capacity=100, refill_tokens=10, refill_interval=60)

    def charge(self, held, meter=None):
        store = MemoryBucketStore(FakeClock())
        quota = store.take("k", held, self.POLICY)
        return store, Charge(store, "k", self.POLICY, quota, held, meter=meter,
                             prompt_estimate=4)

    def metered(self):
        """A meter that read a non-stream answer reporting 7 tokens (5 prompt, 2 completion)."""
        meter = UsageMeter(stream=False)
        meter.feed(json.dumps({"choices": [], "usage": {"prompt_tokens": 5,
                                                        "completion_tokens": 2,
                                                        "total_tokens": 7}}).encode())
        meter.finish()
        return meter

    def test_transitions(self):
        table = [  # (usage mode, ending) -> (state, cost)
            (False, NOT_SENT, "refunded", 0), (False, NO_ANSWER, "settled", 20),
            (False, FAILED, "refunded", 0), (False, REFUSED, "settled", 20),
            (False, LEFT, "settled", 20), (False, BROKEN, "settled", 20),
            (False, ANSWERED, "settled", 20),
            (True, NOT_SENT, "refunded", 0), (True, NO_ANSWER, "settled", 7),
            (True, FAILED, "refunded", 0), (True, REFUSED, "settled", 7),  # what it reported
            (True, LEFT, "settled", 7), (True, BROKEN, "settled", 7),
            (True, ANSWERED, "settled", 7),
        ]
        for usage, ending, state, cost in table:
            with self.subTest(usage=usage, ending=ending):
                store, charge = self.charge(20, self.metered() if usage else None)
                self.assertEqual((charge.state, charge.cost, charge.remaining), ("held", 20, 80))
                charge.close(ending)
                self.assertEqual((charge.state, charge.cost), (state, cost))
                self.assertEqual(store.peek("k", self.POLICY).remaining, 100 - cost)
                self.assertEqual(charge.remaining, 100 - cost)  # the balance shown
                self.assertEqual(store.usage("k")["tokens_charged"], cost)
                for again in (ANSWERED, NOT_SENT):  # a second close moves nothing
                    charge.close(again)
                    self.assertEqual((charge.state, charge.cost), (state, cost))
                    self.assertEqual(store.peek("k", self.POLICY).remaining, 100 - cost)

    def test_a_declined_charge_moves_nothing(self):
        charge = Charge.declined(None)
        charge.close(ANSWERED)
        self.assertEqual((charge.state, charge.cost, charge.remaining), ("declined", 0, None))


class FramingTests(unittest.TestCase):
    def test_decisions(self):
        table = [  # (status, method, http11, upstream length, length kept) -> framing
            (200, "POST", True, 120, True, Framing("length", 120)),
            (200, "POST", True, 120, False, Framing("chunked")),   # the meter strips bytes
            (200, "POST", True, None, True, Framing("chunked")),   # upstream chunked/closed
            (200, "POST", False, None, True, Framing("close")),    # an HTTP/1.0 client
            (200, "POST", False, 120, True, Framing("length", 120)),
            (204, "POST", True, None, True, Framing("none")),
            (304, "GET", True, 10, True, Framing("none")),
            (200, "HEAD", True, 120, True, Framing("none")),
            (500, "POST", True, 0, True, Framing("length", 0)),
        ]
        for status, method, http11, length, kept, expected in table:
            with self.subTest(status=status, method=method, http11=http11, length=length,
                              kept=kept):
                self.assertEqual(choose_framing(status=status, method=method, http11=http11,
                                                upstream_length=length, length_kept=kept),
                                 expected)

    def test_chunk_framing(self):
        self.assertEqual(llm_proxy.frame_chunk(b"x" * 26), b"1a\r\n" + b"x" * 26 + b"\r\n")
        self.assertEqual(llm_proxy.LAST_CHUNK, b"0\r\n\r\n")


class FairGateTests(unittest.TestCase):
    """The gate's order with threads and no sockets: one slot, one key holding it, four
    requests queued (three of that key, then one of another)."""

    def order(self, fair):
        gate = FairGate(1, fair=fair)
        self.assertEqual(gate.enter("a", WAIT, lambda: False), "ok")
        served, threads = [], []

        def queue(key, name):
            if gate.enter(key, WAIT, lambda: False) == "ok":
                served.append(name)
                gate.leave(key)
        for index, (key, name) in enumerate((("a", "a2"), ("a", "a3"), ("a", "a4"),
                                             ("b", "b1"))):
            thread = threading.Thread(target=queue, args=(key, name))
            thread.start()
            threads.append(thread)
            self.assertTrue(wait_until(lambda: gate.waiting() == index + 1))
        gate.leave("a")
        for thread in threads:
            thread.join(WAIT)
        return served

    def test_a_freed_slot_goes_to_the_key_with_fewest_in_flight(self):
        self.assertEqual(self.order(fair=True), ["b1", "a2", "a3", "a4"])

    def test_first_come_first_served_when_fairness_is_off(self):
        self.assertEqual(self.order(fair=False), ["a2", "a3", "a4", "b1"])

    def test_leaving_the_queue(self):
        gate = FairGate(1)
        self.assertEqual(gate.enter("a", WAIT, lambda: False), "ok")
        self.assertEqual(gate.enter("b", 0.2, lambda: False), "timeout")
        self.assertEqual(gate.enter("b", WAIT, lambda: True), "gone")
        self.assertEqual(gate.waiting(), 0)
        gate.leave("a")
        self.assertEqual(gate.enter("b", WAIT, lambda: False), "ok")  # the slot is free again


class _LinesOnly:
    """A reader without peek(): read_headers takes its line-by-line path."""

    def __init__(self, data: bytes) -> None:
        self._fp = io.BytesIO(data)
        self.readline = self._fp.readline
        self.read = self._fp.read


class HeaderParserTests(unittest.TestCase):
    """read_headers' two paths (one regular expression on a whole buffered block, or line by
    line) fed the same random blocks must agree, with each other and with the standard library
    where they accept a block."""

    PIECES = [b"Host", b"X-A", b"a", b"Content-Length", b":", b": ", b" ", b"\t", b"v", b"1",
              b"\r\n", b"\n", b"\r", b"\x00", b"\xe9", b"(", b"x y", b"::", b"\r\n "]

    def parse(self, reader):
        try:
            return ("ok", read_headers(reader, 4096).items())
        except HeaderError as err:
            return ("refused", err.status)
        except EOFError:
            return ("cut off", None)

    def random_block(self, rng):
        lines = []
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.7:
                lines.append(rng.choice([b"Host", b"X-A", b"Accept", b"a"]) + b":" +
                             rng.choice([b" ", b"", b"  "]) + rng.choice([b"v", b"x y", b"1", b""])
                             + rng.choice([b"", b" ", b"\t"]) + b"\r\n")
            else:
                lines.append(b"".join(rng.choice(self.PIECES) for _ in range(rng.randint(1, 6))))
        return b"".join(lines) + rng.choice([b"\r\n", b"", b"\n", b"\r\n\r\n"]) + b"rest"

    def test_both_paths_agree_with_each_other_and_with_the_standard_library(self):
        rng = random.Random(20261201)
        accepted = whole = 0
        for _ in range(4000):
            block = self.random_block(rng)
            # (the one-pattern path takes a block or leaves it all to the line-by-line one)
            whole += llm_proxy._read_header_block(io.BufferedReader(io.BytesIO(block)),
                                                  4096) is not None
            buffered = io.BufferedReader(io.BytesIO(block))
            lines_only = _LinesOnly(block)
            fast, slow = self.parse(buffered), self.parse(lines_only)
            self.assertEqual(fast, slow, block)
            self.assertEqual(buffered.read(), lines_only.read(), block)  # the same leftover
            if fast[0] == "ok":
                accepted += 1
                stdlib = http.client.parse_headers(io.BytesIO(block))
                self.assertEqual(fast[1], [(n, v.rstrip(" \t")) for n, v in stdlib.items()],
                                 block)
        self.assertGreater(accepted, 1000)  # the comparison with the stdlib really ran
        self.assertGreater(whole, 1000)  # and the fast path was among what was compared

    def test_refusals(self):
        for block, status in ((b"A : x\r\n\r\n", 400), (b" A: x\r\n\r\n", 400),
                              (b"A: x\r\n folded\r\n\r\n", 400), (b"A: x\x00\r\n\r\n", 400),
                              (b"NoColon\r\n\r\n", 400), (b"A: \r\tx\r\n\r\n", 400), (b"A: " + b"x" * 5000 + b"\r\n\r\n", 431)):
            with self.subTest(block=block[:20]):
                for reader in (io.BufferedReader(io.BytesIO(block)), _LinesOnly(block)):
                    self.assertEqual(self.parse(reader), ("refused", status))


class IsoMomentTests(unittest.TestCase):
    def test_a_trailing_z_is_utc_on_every_python(self):
        """The keys file and the audit trail write times with a Z, which Python 3.10's
        fromisoformat does not read."""
        utc = datetime.timezone.utc
        self.assertEqual(llm_proxy.from_iso("2026-12-07T00:31:27Z"),
                         datetime.datetime(2026, 12, 7, 0, 31, 27, tzinfo=utc))
        self.assertEqual(llm_proxy.from_iso("2026-12-07T00:31"),
                         datetime.datetime(2026, 12, 7, 0, 31))
