"""Usage mode's bounded overshoot (issue 20, item 5): a request that sets no output limit is
forwarded with one, held with its reservation, so a burst cannot spend more than the key has;
MAX_RESERVE_TOKENS lets an agent that asks for a large max_tokens reserve less, the rest
settled as debt; the limit text says long waits in words."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import unittest

import llm_proxy
from tests.support import CLIENT_KEY, WAIT, ProxyTestCase, at_once, scenario

LONG_ANSWER = 2400  # what a model runs to when nothing stops it


@scenario("to-the-limit")
def _to_the_limit(h, path, request):
    """A plain answer that generated up to the output limit it was sent (OpenAI's max_tokens,
    Anthropic's max_tokens), or LONG_ANSWER tokens when it was sent none, as a model that
    is not stopped runs on; its usage says so."""
    limit = request.get("max_tokens")
    generated = min(limit, LONG_ANSWER) if isinstance(limit, int) and limit > 0 else LONG_ANSWER
    if path == "/v1/messages":
        h.json(200, {"id": "msg_x", "type": "message", "role": "assistant", "model": "m",
                     "content": [{"type": "text", "text": "x" * generated}],
                     "stop_reason": "max_tokens", "stop_sequence": None,
                     "usage": {"input_tokens": 10, "output_tokens": generated}})
        return
    h.json(200, {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": "x" * generated},
                              "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": generated,
                           "total_tokens": 10 + generated}})


class BoundedOvershootTests(ProxyTestCase):
    def used_today(self):
        status, _, body = self.request("GET", "/v1/usage")
        self.assertEqual(status, 200)
        return json.loads(body)

    def burst(self, count=10):
        statuses = []
        at_once(count, lambda _: statuses.append(self.chat(
            headers={"X-Fake-Scenario": "to-the-limit"})[0]))
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))
        return statuses

    def test_a_burst_without_limits_never_spends_past_a_daily_quota(self):
        self.restart(token_cost_mode="usage", max_tokens=100_000, tokens_per_day=3000)
        self.assertEqual(self.burst(), [200] * 10)  # answers, or the limit said as one
        sent = [json.loads(r[3]) for r in self.upstream.requests]
        self.assertGreaterEqual(len(sent), 3)
        counted = sum(min(s["max_tokens"], LONG_ANSWER) + 10 for s in sent)
        self.assertEqual(100_000 - self.remaining(), counted)  # settled as the server counted
        # (24,018 before: each held 258 and ran on.) Past the quota by at most what the server
        # counted of each prompt beyond the proxy's estimate of it (its chat template):
        estimate = llm_proxy.prompt_estimate(json.loads(self.upstream.requests[0][3]))
        self.assertLessEqual(counted, 3000 + len(sent) * (10 - estimate))
        self.assertGreater(counted, 2500)

    def test_an_answer_without_a_limit_is_forwarded_with_max_output_tokens(self):
        self.restart(token_cost_mode="usage", max_tokens=100_000, max_output_tokens=1000)
        status, headers, _ = self.chat(headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(self.upstream.requests[0][3])["max_tokens"], 1000)
        self.assertTrue(self.log.wait_for(lambda text: " cost=1010" in text))
        self.assertEqual(100_000 - self.remaining(), 1010)  # settled exactly

    def test_a_request_with_its_own_limit_keeps_it_in_every_field_a_server_reads(self):
        self.restart(token_cost_mode="usage", max_tokens=100_000)
        self.chat(max_completion_tokens=7)  # (Ollama reads only max_tokens)
        sent = json.loads(self.upstream.requests[0][3])
        self.assertEqual((sent["max_tokens"], sent["max_completion_tokens"], sent["n_predict"]),
                         (7, 7, 7))
        self.chat(max_tokens=0, headers={"X-Fake-Scenario": "to-the-limit"})  # 0: none
        self.assertEqual(json.loads(self.upstream.requests[1][3])["max_tokens"], 4096)

    def test_the_last_admitted_gets_only_what_is_left(self):
        self.restart(token_cost_mode="usage", max_tokens=1000, response_token_reserve=100)
        self.chat(max_tokens=600, headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertTrue(self.log.wait_for(lambda text: " cost=610" in text))  # 390 left
        prompt = llm_proxy.prompt_estimate(json.loads(self.upstream.requests[0][3]))
        self.chat(headers={"X-Fake-Scenario": "to-the-limit"})  # reserves prompt + 100
        self.assertEqual(json.loads(self.upstream.requests[1][3])["max_tokens"],
                         100 + (390 - prompt - 100) // 2)


class AgentReserveTests(ProxyTestCase):
    """Claude Code sends max_tokens: 32000 with a long prompt and uses a few thousand."""

    AGENT = {"model": "m", "max_tokens": 32000, "stream": False,
             "messages": [{"role": "user", "content": "y" * 60_000}]}

    def test_without_a_cap_the_agent_is_refused_with_what_it_would_reserve(self):
        self.restart(token_cost_mode="usage", max_tokens=40_000, limit_response="429")
        status, _, body = self.request("POST", "/v1/messages", self.AGENT,
                                       headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertEqual(status, 400, body)
        self.assertEqual(self.upstream.requests, [])

    def test_max_reserve_tokens_admits_it_and_settles_what_it_used(self):
        self.restart(token_cost_mode="usage", max_tokens=40_000, max_reserve_tokens=8000)
        status, headers, body = self.request("POST", "/v1/messages", self.AGENT,
                                             headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["x-ratelimit-remaining"], str(40_000 - 8000))
        self.assertEqual(json.loads(self.upstream.requests[0][3])["max_tokens"], 32000)
        self.assertTrue(self.log.wait_for(lambda text: " cost=2410" in text))
        self.assertEqual(self.remaining(), 40_000 - 2410)

    def test_what_it_costs_past_the_reservation_is_debt_bounded_by_its_own_limit(self):
        self.restart(token_cost_mode="usage", max_tokens=3000, max_reserve_tokens=1000)
        small = {**self.AGENT, "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 3500}
        status, _, _ = self.request("POST", "/v1/messages", small,
                                    headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertEqual(status, 200)
        self.assertTrue(self.log.wait_for(lambda text: " cost=2410" in text))
        self.assertEqual(self.remaining(), 3000 - 2410)
        # the key's own file setting overrides the global one
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"keys": [{"name": "agent", "key": CLIENT_KEY,
                                 "max_reserve_tokens": 500}]}, f)
        self.addCleanup(os.unlink, f.name)
        self.restart(token_cost_mode="usage", max_tokens=40_000, keys_file=f.name)
        _, headers, _ = self.request("POST", "/v1/messages", self.AGENT,
                                     headers={"X-Fake-Scenario": "to-the-limit"})
        self.assertEqual(headers["x-ratelimit-remaining"], str(40_000 - 500))


@unittest.skipIf(shutil.which("claude") is None, "the claude CLI is not installed")
class ClaudeCodeTests(ProxyTestCase):
    def test_claude_code_is_admitted_with_a_reserve_cap_and_charged_what_it_used(self):
        self.restart(token_cost_mode="usage", max_tokens=40_000, max_reserve_tokens=8000)
        env = {**os.environ, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{self.proxy.server_address[1]}",
               "ANTHROPIC_AUTH_TOKEN": CLIENT_KEY, "ANTHROPIC_MODEL": "m",
               "ANTHROPIC_SMALL_FAST_MODEL": "m", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "HOME": tempfile.mkdtemp()}
        done = subprocess.run(["claude", "-p", "say hi", "--output-format", "json"], env=env,
                              capture_output=True, text=True, timeout=WAIT * 6)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertNotIn("limit reached", json.loads(done.stdout)["result"])
        sent = [json.loads(r[3]) for r in self.upstream.requests if r[1].startswith("/v1/messages")]
        self.assertTrue(sent)
        self.assertGreater(len(self.upstream.requests[0][3]), 40_000)  # its bytes: over the bucket
        self.assertTrue(self.log.wait_for(
            lambda text: text.count("POST /v1/messages") == len(sent) and " cost=" in text))
        self.assertEqual(40_000 - self.remaining(), sum(self.upstream.reported))


if __name__ == "__main__":
    unittest.main()
