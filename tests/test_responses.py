"""The Responses API (/v1/responses, the API Codex speaks): the limit said in its own shape, a
429 that a client gives up on at once when the wait is long, and a normal answer relayed and
settled. Driven with the official openai package where it is installed."""

from __future__ import annotations

import json
import time
import unittest

import llm_proxy
from tests.support import CLIENT_KEY, ProxyTestCase, WAIT

try:
    import openai
except ImportError:  # the real-client tests are skipped
    openai = None

#: The events of a one-message answer, in the order a server sends them.
ANSWER_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.content_part.done", "response.output_item.done", "response.completed"]


def named_events(body):
    """[(event name, data object)] of an event stream with `event:` lines."""
    found = []
    for block in body.split(b"\n\n"):
        lines = block.split(b"\n")
        if len(lines) == 2 and lines[0].startswith(b"event: "):
            found.append((lines[0][7:].decode(), json.loads(lines[1][6:])))
    return found


class ResponsesLimitShapeTests(ProxyTestCase):
    """Without the SDK: the exact shape of the limit answer."""

    def spend(self, n=10):
        for _ in range(n):
            self.request("POST", "/v1/responses", {"model": "m", "input": "hi"})

    def test_the_limit_is_a_completed_response_with_one_message(self):
        self.spend()
        status, headers, body = self.request("POST", "/v1/responses",
                                             {"model": "m", "input": "hi"})
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertEqual((answer["object"], answer["status"], answer["model"]),
                         ("response", "completed", "m"))
        [item] = answer["output"]
        self.assertEqual((item["type"], item["role"], item["status"]),
                         ("message", "assistant", "completed"))
        self.assertEqual(item["content"], [{"type": "output_text", "annotations": [],
                                            "text": "limit reached, wait 5 min"}])
        self.assertEqual(answer["usage"]["total_tokens"], 0)
        self.assertEqual(headers["x-ratelimit-remaining"], "0")
        self.assertEqual(len(self.upstream.requests), 10)

    def test_the_streamed_limit_is_the_event_sequence_of_a_one_message_answer(self):
        self.spend()
        status, headers, body = self.request("POST", "/v1/responses",
                                             {"model": "m", "input": "hi", "stream": True})
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        events = named_events(body)
        self.assertEqual([name for name, _ in events], ANSWER_EVENTS)
        self.assertEqual([data["type"] for _, data in events], ANSWER_EVENTS)
        self.assertEqual([data["sequence_number"] for _, data in events], list(range(9)))
        by_name = dict(events)
        self.assertEqual(by_name["response.output_text.delta"]["delta"],
                         "limit reached, wait 5 min")
        done = by_name["response.completed"]["response"]
        self.assertEqual(done["status"], "completed")
        self.assertEqual(done["output"][0]["content"][0]["text"], "limit reached, wait 5 min")
        self.assertEqual(by_name["response.created"]["response"]["id"], done["id"])
        self.assertNotIn(b"[DONE]", body)

    def test_a_long_wait_in_429_mode_says_usage_limit_reached_with_the_reset(self):
        self.restart(limit_response="429")
        self.spend()
        before = int(time.time())
        status, headers, body = self.request("POST", "/v1/responses",
                                             {"model": "m", "input": "hi"})
        self.assertEqual(status, 429)
        error = json.loads(body)["error"]
        self.assertEqual((error["type"], error["code"]), ("usage_limit_reached",
                                                          "rate_limit_exceeded"))
        self.assertEqual(error["resets_in_seconds"], 300)
        self.assertTrue(before + 300 <= error["resets_at"] <= int(time.time()) + 300)
        self.assertIn("limit reached, wait 5 min", error["message"])
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertEqual(headers["retry-after"], "300")

    def test_a_wait_of_a_minute_or_less_stays_an_ordinary_retryable_429(self):
        self.restart(limit_response="429", refill_interval_seconds=45)
        self.spend()
        status, headers, body = self.request("POST", "/v1/responses",
                                             {"model": "m", "input": "hi"})
        error = self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertEqual(error["type"], "requests")
        self.assertEqual(headers["retry-after"], "45")
        self.assertNotIn("x-should-retry", headers)

    def test_a_request_the_bucket_could_never_hold_is_said_as_the_limit(self):
        self.restart(token_cost_mode="estimate", max_tokens=100)
        status, _, body = self.request("POST", "/v1/responses",
                                       {"model": "m", "input": "hi", "max_output_tokens": 500})
        self.assertEqual(status, 200)
        text = json.loads(body)["output"][0]["content"][0]["text"]
        self.assertTrue(text.startswith("limit reached: this request needs 502 tokens but a "
                                        "bucket holds at most 100"), text)
        self.assertEqual(self.upstream.requests, [])
        self.restart(token_cost_mode="estimate", max_tokens=100, limit_response="429")
        status, _, body = self.request("POST", "/v1/responses",
                                       {"model": "m", "input": "hi", "max_output_tokens": 500})
        self.assert_openai_error(status, body, 400, "request_exceeds_bucket")
        self.assertEqual(self.upstream.requests, [])

    def test_a_spent_calendar_quota_is_said_with_its_reset_in_words(self):
        self.restart(requests_per_day=1)
        self.request("POST", "/v1/responses", {"model": "m", "input": "hi"})
        status, _, body = self.request("POST", "/v1/responses", {"model": "m", "input": "hi"})
        self.assertEqual(status, 200)
        text = json.loads(body)["output"][0]["content"][0]["text"]
        self.assertTrue(text.startswith("daily request limit reached, resets in "), text)
        self.assertNotRegex(text, r"\d{3,} min")
        self.assertEqual(len(self.upstream.requests), 1)


@unittest.skipIf(openai is None, "the official openai package is not installed")
class ResponsesClientTests(ProxyTestCase):
    """The openai package's responses.create and responses.stream against the proxy."""

    def client(self, max_retries=0):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.proxy.server_address[1]}/v1",
                             api_key=CLIENT_KEY, max_retries=max_retries, timeout=WAIT)

    def spend(self, client, n=10):
        for _ in range(n):
            client.responses.create(model="m", input="hi")

    def test_an_answer_is_relayed_and_settled_as_the_server_counted(self):
        self.restart(token_cost_mode="usage", max_tokens=10_000, response_token_reserve=50)
        client = self.client()
        answer = client.responses.create(model="m", input="hi")
        self.assertEqual(answer.output_text, "proxy ok")
        with client.responses.stream(model="m", input="hi") as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
        self.assertEqual(text, "Hello world")
        self.assertEqual(final.output_text, "Hello world")
        self.assertTrue(self.log.wait_for(lambda log: log.count(" 200 ") == 2))
        charged = 10_000 - self.remaining()
        self.assertEqual(charged, answer.usage.total_tokens + final.usage.total_tokens)

    def test_the_limit_reads_as_text_plain_and_streamed(self):
        client = self.client()
        self.spend(client)
        answer = client.responses.create(model="m", input="hi")
        self.assertEqual(answer.output_text, "limit reached, wait 5 min")
        with client.responses.stream(model="m", input="hi") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        self.assertEqual(deltas, ["limit reached, wait 5 min"])
        self.assertEqual(final.output_text, "limit reached, wait 5 min")
        self.assertEqual(final.usage.total_tokens, 0)

    def test_in_429_mode_a_long_wait_fails_at_once_without_retrying(self):
        self.restart(limit_response="429")
        client = self.client(max_retries=2)
        self.spend(client)
        with self.assertRaises(openai.RateLimitError) as caught:
            client.responses.create(model="m", input="hi")
        self.assertEqual(caught.exception.body["type"], "usage_limit_reached")
        self.assertTrue(self.log.wait_for(lambda log: log.count('" 429 ') == 1))
        self.assertEqual(len(self.upstream.requests), 10)

    def test_a_never_admitted_request_and_a_calendar_quota_read_as_text(self):
        self.restart(token_cost_mode="estimate", max_tokens=100, requests_per_day=1)
        client = self.client()
        answer = client.responses.create(model="m", input="hi", max_output_tokens=500)
        self.assertTrue(answer.output_text.startswith("limit reached: this request needs"))
        client.responses.create(model="m", input="hi", max_output_tokens=5)
        with client.responses.stream(model="m", input="hi", max_output_tokens=5) as stream:
            final = stream.get_final_response()
        self.assertTrue(final.output_text.startswith("daily request limit reached, resets in"))


class WaitInWordsTests(unittest.TestCase):
    def test_long_waits_read_in_hours_and_days(self):
        for seconds, text in [(3599, "1 h"), (3540, "59 min"), (3600, "1 h"), (3601, "1 h 1 min"),
                              (12_000, "3 h 20 min"), (47 * 3600, "47 h"),
                              (48 * 3600, "2 days"), (119_115 * 60, "82 days 18 h")]:
            with self.subTest(seconds=seconds):
                self.assertEqual(llm_proxy.wait_text(seconds), text)

    def test_a_calendar_reset_far_away_names_its_moment(self):
        calendar = llm_proxy.Calendar("UTC", wall=lambda: 1_798_761_600.0 - 3 * 86400)
        self.assertEqual(llm_proxy.reset_text(3 * 86400, calendar),
                         "3 days (on Fri 1 Jan 00:00 UTC)")
        self.assertEqual(llm_proxy.reset_text(3600, calendar), "1 h")


if __name__ == "__main__":
    unittest.main()
