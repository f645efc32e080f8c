"""The bucket contract against the memory store and Redis; several proxies on one Redis."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from llm_proxy import BucketPolicy
from llm_proxy import MemoryBucketStore
import llm_proxy

from tests.support import (
    Config, FakeClock, HERE, LogCapture, NO_REDIS, ProxyTestCase, WAIT, WithRedis, free_port,
    at_once, wait_until)


class BucketContract:
    """What every bucket store must do, run against the in-memory store and against Redis.
    Subclasses provide self.store, self.advance(seconds) and self.held() (buckets stored)."""

    policy = BucketPolicy(capacity=10, refill_tokens=2, refill_interval=300)

    def assertSeconds(self, actual, expected):
        self.assertAlmostEqual(actual, expected, delta=0.05)  # Redis' clock moves meanwhile

    def test_starts_full_and_refuses_when_empty(self):
        for expected in range(9, -1, -1):
            quota = self.store.take("k", 1, self.policy)
            self.assertTrue(quota.admitted)
            self.assertEqual(quota.remaining, expected)
        quota = self.store.take("k", 1, self.policy)
        self.assertFalse(quota.admitted)
        self.assertEqual(quota.remaining, 0)
        self.assertSeconds(quota.wait_seconds, 300)

    def test_discrete_refills_on_the_bucket_grid(self):
        self.store.take("k", 10, self.policy)
        self.advance(299)
        self.assertFalse(self.store.take("k", 1, self.policy).admitted)
        self.advance(1.01)  # first refill: +2
        self.assertEqual(self.store.peek("k", self.policy).remaining, 2)
        self.advance(450)  # 750 s in: a second refill at 600, the next at 900
        quota = self.store.peek("k", self.policy)
        self.assertEqual(quota.remaining, 4)
        self.assertSeconds(quota.reset_seconds, 150 - 0.01)
        self.advance(10_000)
        self.assertEqual(self.store.peek("k", self.policy).remaining, 10)

    def test_wait_counts_the_refills_a_cost_needs(self):
        self.store.take("k", 10, self.policy)
        self.advance(100)
        quota = self.store.take("k", 5, self.policy)  # needs 3 refills: at 300, 600, 900
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 800)

    def test_cost_above_capacity_waits_forever(self):
        self.assertEqual(self.store.take("k", 11, self.policy).wait_seconds, float("inf"))

    def test_full_buckets_are_forgotten(self):
        self.store.take("a", 1, self.policy)
        self.assertEqual(self.held(), 1)
        self.store.settle("a", -1, self.policy, refund=True)
        self.assertEqual(self.held(), 0)
        self.store.take("b", 5, self.policy)
        self.store.peek("unseen", self.policy)
        self.assertEqual(self.held(), 1)  # peek creates nothing
        self.advance(600.01)
        self.assertEqual(self.store.peek("b", self.policy).remaining, 9)
        self.advance(300)
        self.assertEqual(self.store.peek("b", self.policy).remaining, 10)
        self.assertEqual(self.held(), 0)

    def test_a_full_bucket_behaves_like_a_new_one(self):
        self.store.take("old", 1, self.policy)
        self.advance(1000)  # refilled long ago; the grid restarts at the next spend
        self.store.take("old", 2, self.policy)
        self.store.take("new", 2, self.policy)
        self.advance(299)
        old, new = self.store.peek("old", self.policy), self.store.peek("new", self.policy)
        self.assertEqual((old.remaining, old.limit), (new.remaining, new.limit))
        self.assertSeconds(old.reset_seconds, new.reset_seconds)

    def test_debt_is_paid_by_refills_first_and_counted_in_the_wait(self):
        self.store.take("k", 4, self.policy)                 # 6 left, the grid starts now
        quota = self.store.settle("k", 9, self.policy)       # it really cost 13: 3 in debt
        self.assertEqual(quota.remaining, -3)
        quota = self.store.take("k", 1, self.policy)
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 600)          # +2 at 300 (-1), +2 at 600 (1)
        self.advance(300.01)
        self.assertEqual(self.store.peek("k", self.policy).remaining, -1)
        self.advance(300)
        self.assertTrue(self.store.take("k", 1, self.policy).admitted)
        self.assertEqual(self.store.settle("k", -100, self.policy).remaining, 10)  # never above

    def test_refund_never_exceeds_capacity(self):
        self.store.take("k", 1, self.policy)
        self.assertEqual(self.store.settle("k", -5, self.policy, refund=True).remaining, 10)

    def test_usage_counters(self):
        self.store.take("a", 4, self.policy)                         # charged 4
        self.store.take("a", 20, self.policy)                        # limited
        self.store.settle("a", 3, self.policy, prompt=10, completion=5)  # it cost 7
        self.store.take("a", 0, self.policy)                         # charged 0
        self.assertEqual(self.store.usage("a"), {"requests": 3, "limited_requests": 1,
                                                 "prompt_tokens": 10, "completion_tokens": 5,
                                                 "tokens_charged": 7})
        self.assertEqual(self.store.usage("b")["requests"], 0)

    def test_concurrent_takes_admit_exactly_the_balance(self):
        admitted = []
        at_once(40, lambda _: admitted.append(self.store.take("k", 1, self.policy).admitted))
        self.assertEqual(admitted.count(True), 10)


class BucketTests(BucketContract, unittest.TestCase):
    """The in-memory store: the contract, plus what only it has (a sweep, bounded counters)."""

    def setUp(self):
        self.clock = FakeClock()
        self.store = MemoryBucketStore(self.clock)

    def advance(self, seconds):
        self.clock.advance(seconds)

    def held(self):
        return len(self.store)

    def test_sweep_bounds_memory_under_a_flood_of_keys(self):
        for i in range(5000):
            self.store.take(f"random-{i}", 1, self.policy)
        self.assertEqual(len(self.store), 5000)
        self.clock.advance(300)   # every one of them has refilled to full
        self.store.take("fresh", 1, self.policy)
        self.assertEqual(len(self.store), 1)

    def test_at_most_max_buckets_the_least_recently_used_forgotten(self):
        """Open mode: a flood of invented keys holds at most max_buckets buckets."""
        store = MemoryBucketStore(self.clock, max_buckets=100)
        store.take("kept", 5, self.policy)
        for i in range(1000):
            store.take(f"invented-{i}", 1, self.policy)
            if i % 50 == 0:
                store.take("kept", 1, self.policy)  # used now and then: stays
        self.assertEqual(len(store), 100)
        self.assertEqual(store.peek("kept", self.policy).remaining, 0)  # remembered, spent
        self.assertEqual(store.peek("invented-0", self.policy).remaining, 10)  # forgotten

    def test_the_bound_applies_where_anyone_can_invent_keys(self):
        self.assertEqual(llm_proxy.max_buckets_of(Config(max_buckets=5)), 5)
        self.assertEqual(llm_proxy.max_buckets_of(Config(max_buckets=5, proxy_api_keys=("k",))), 0)
        self.assertEqual(llm_proxy.make_store(Config(), print, llm_proxy.Metrics()).max_buckets,
                         100_000)

    def test_usage_counters_are_bounded(self):
        self.store.take("a", 1, self.policy)
        self.store.take("a", 1, self.policy)
        for i in range(llm_proxy.MAX_TRACKED_KEYS):
            self.store.settle(f"k{i}", 0, self.policy, prompt=1)
        self.assertEqual(self.store.usage("a")["requests"], 0)  # the least recently used went


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisBucketTests(WithRedis, BucketContract, unittest.TestCase):
    """The same contract against the Redis store (time is Redis's own: advance() moves every
    bucket's grid back instead)."""

    def setUp(self):
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        self.client.flushall()
        self.log = LogCapture()
        config = Config(redis_url=self.redis.url)
        self.store = llm_proxy.RedisBucketStore(config, self.log.write, llm_proxy.Metrics())

    def advance(self, seconds):
        for name in self.client.scan_iter("llm_proxy:b:*"):
            self.client.hincrbyfloat(name, "a", -seconds)

    def held(self):
        return len(list(self.client.scan_iter("llm_proxy:b:*")))

    def test_keys_are_digests_and_expire_when_full_again(self):
        self.store.take("key:sk-secret-client-key", 3, self.policy)
        names = sorted(n.decode() for n in self.client.scan_iter("*"))
        digest = llm_proxy.key_digest("key:sk-secret-client-key")
        self.assertEqual(names, [f"llm_proxy:b:{{{digest}}}", f"llm_proxy:u:{{{digest}}}"])
        # 7 of 10: two refills (600 s) bring it back to full, and then it is not needed
        self.assertAlmostEqual(self.client.pttl(names[0]) / 1000, 600, delta=1)
        self.assertEqual(self.client.hget(names[1], "tokens_charged"), b"3")
        self.assertNotIn(b"sk-secret", b" ".join(self.client.keys("*")))

    def test_time_comes_from_the_redis_server(self):
        skewed = llm_proxy.RedisBucketStore(Config(redis_url=self.redis.url), self.log.write,
                                            llm_proxy.Metrics(), clock=FakeClock(now=-1e9))
        skewed.take("k", 10, self.policy)            # an instance whose clock is far off
        quota = self.store.take("k", 1, self.policy)  # and one whose clock is right
        self.assertFalse(quota.admitted)
        self.assertSeconds(quota.wait_seconds, 300)  # both measured on the server's clock

    def test_script_reloaded_after_script_flush(self):
        self.store.take("k", 1, self.policy)
        self.client.script_flush()  # NOSCRIPT on the next call: loaded again
        self.assertEqual(self.store.take("k", 1, self.policy).remaining, 8)


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisProxyTests(WithRedis, ProxyTestCase):
    """Several proxy instances sharing one Redis, and Redis going away."""

    def setUp(self):
        super().setUp()
        client = self.redis.client()
        client.flushall()
        client.close()

    def instance(self, **settings):
        settings.setdefault("redis_url", self.redis.url)
        return self.start_proxy(**settings)

    def test_three_instances_admit_exactly_the_shared_balance(self):
        proxies = [self.instance(max_tokens=100) for _ in range(3)]
        results = []

        def worker(index):
            for _ in range(5):
                results.append(self.chat(proxy=proxies[index % 3])[2])
        at_once(60, worker, WAIT * 3)
        self.assertEqual(len(results), 300)
        self.assertEqual(len(self.upstream.requests), 100)
        self.assertEqual(sum(b"limit reached" in r for r in results), 200)

    def test_calendar_quotas_are_shared_and_admitted_atomically(self):
        """Three instances, one daily quota of 20 tokens: exactly 20 requests reach the
        upstream however they are spread, and the others are told what ran out."""
        proxies = [self.instance(max_tokens=1000, tokens_per_day=20) for _ in range(3)]
        results = []

        def worker(index):
            for _ in range(2):
                results.append(self.chat(proxy=proxies[index % 3])[2])
        at_once(30, worker, WAIT * 3)
        self.assertEqual(len(self.upstream.requests), 20)
        self.assertEqual(sum(b"daily limit reached, resets in" in r for r in results), 40)
        self.assertEqual(json.loads(self.request("GET", "/health", proxy=proxies[0])[2])[
            "quota"]["remaining"], 1000 - 20)  # refused: charged nothing anywhere

    def test_quotas_settle_with_usage_and_the_ledger_is_shared(self):
        first, second = (self.instance(token_cost_mode="usage", max_tokens=100_000,
                                       tokens_per_day=100_000) for _ in range(2))
        self.chat(proxy=first, model="m1")
        self.chat(proxy=second, model="m2")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        for proxy in (first, second):
            self.assertTrue(proxy.writer.flush())
        quotas = json.loads(self.request("GET", "/v1/usage", proxy=second)[2])["quotas"]
        self.assertEqual(quotas[0]["used"], sum(self.upstream.reported))
        report = json.loads(self.request("GET", "/admin/usage?by=model", key=None,
                                         proxy=first)[2])["rows"]
        self.assertEqual([(r["model"], r["requests"]) for r in report], [("m1", 1), ("m2", 1)])
        out = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py"), "usage",
                              "--by", "model", "--format", "json"],
                             env={**os.environ, "REDIS_URL": self.redis.url},
                             capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(sum(r["tokens_charged"] for r in json.loads(out.stdout)),
                         sum(self.upstream.reported))

    def test_usage_is_settled_across_instances(self):
        first, second = (self.instance(token_cost_mode="usage", max_tokens=1000)
                         for _ in range(2))
        self.chat(proxy=first)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 1))
        status, _, body = self.request("GET", "/health", proxy=second)
        health = json.loads(body)
        self.assertEqual(health["quota"]["remaining"], 1000 - self.upstream.reported[0])
        self.assertEqual(health["usage"]["requests"], 1)
        self.assertEqual(health["store"], {"backend": "redis", "reachable": True,
                                           "failure_mode": "local"})

    def test_outage_in_local_mode_keeps_serving_and_recovers(self):
        proxy = self.instance()
        self.assertEqual(self.chat(proxy=proxy)[1]["x-ratelimit-remaining"], "9")
        self.redis.stop()
        try:
            for expected in ("9", "8"):  # this instance's own bucket, starting full
                self.assertEqual(self.chat(proxy=proxy)[1]["x-ratelimit-remaining"], expected)
            health = json.loads(self.request("GET", "/health", proxy=proxy)[2])
            self.assertFalse(health["store"]["reachable"])
        finally:
            self.redis.start()
        self.assertEqual(self.log.getvalue().count("Redis is unreachable"), 1)  # once an outage
        # the local bucket goes on 7, 6, ... and never shows 8 again; the restarted Redis (no
        # persistence) starts from a full bucket, 9 then 8: an 8 means Redis is in use again
        self.assertTrue(wait_until(
            lambda: self.chat(proxy=proxy)[1]["x-ratelimit-remaining"] == "8", timeout=3 * WAIT))
        self.assertIn("reachable again", self.log.getvalue())
        self.assertIn("llm_proxy_store_outages_total 1",
                      self.request("GET", "/metrics", proxy=proxy)[2].decode())
        # no thread was started for the outage: probes ride on requests, one at a time
        self.assertEqual([t.name for t in threading.enumerate() if "redis" in t.name.lower()], [])

    def test_outage_in_closed_mode_answers_503_and_recovers(self):
        proxy = self.instance(redis_failure_mode="closed")
        self.assertEqual(self.chat(proxy=proxy)[0], 200)
        self.redis.stop()
        try:
            status, headers, body = self.chat(proxy=proxy)
            self.assert_openai_error(status, body, 503, "store_unavailable")
            self.assertIn("retry-after", headers)
        finally:
            self.redis.start()
        self.assertTrue(wait_until(lambda: self.chat(proxy=proxy)[0] == 200, timeout=3 * WAIT))
        self.assertEqual(len(self.upstream.requests), 2)

    def test_the_dashboard_with_redis_and_with_redis_gone(self):
        """The overview names Redis and stays up when the store is down in closed mode:
        balances unknown, the rest as it was."""
        proxy = self.instance(redis_failure_mode="closed")
        self.assertEqual(self.chat(proxy=proxy)[0], 200)
        status, _, body = self.request("GET", "/admin/overview", proxy=proxy)
        store = json.loads(body)["store"]
        self.assertEqual((status, store["kind"], store["redis"]["reachable"], store["ok"]),
                         (200, "redis", True, True))
        self.redis.stop()
        try:
            self.assertEqual(self.chat(proxy=proxy)[0], 503)  # (the store is seen down)
            status, _, body = self.request("GET", "/admin/overview", proxy=proxy)
            report = json.loads(body)
            self.assertEqual(status, 200)
            self.assertEqual((report["store"]["redis"]["reachable"], report["store"]["ok"]),
                             (False, False))
            self.assertEqual([k["balance"] for k in report["keys"]], [None])
        finally:
            self.redis.start()

    def test_start_up_with_redis_down(self):
        port = free_port()
        for mode, expected in (("local", 200), ("closed", 503)):
            with self.subTest(mode=mode):
                proxy = self.instance(redis_url=f"redis://:s3cret@127.0.0.1:{port}/0",
                                      redis_failure_mode=mode)
                self.assertEqual(self.chat(proxy=proxy)[0], expected)
                status, _, body = self.request("GET", "/health", proxy=proxy)
                self.assertEqual(status, 200)
                health = json.loads(body)
                self.assertEqual(health["ok"], mode == "local")
                self.assertFalse(health["store"]["reachable"])
                self.assertNotIn(b"s3cret", body)
        self.assertNotIn("s3cret", self.log.getvalue())

    def test_a_slow_redis_never_holds_a_request_past_its_timeout(self):
        stub = socket.socket()
        stub.bind(("127.0.0.1", 0))
        stub.listen(16)  # accepts connections, never answers
        self.addCleanup(stub.close)
        proxy = self.instance(redis_url=f"redis://127.0.0.1:{stub.getsockname()[1]}/0",
                              redis_timeout=0.5)
        started = time.monotonic()
        for _ in range(3):
            self.assertEqual(self.chat(proxy=proxy)[0], 200)
        # one request waited for the timeout; the others went straight to the local buckets
        self.assertLess(time.monotonic() - started, 0.5 + 2)

    def test_missing_redis_package_stops_start_up_with_one_line(self):
        fake = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, fake)
        os.mkdir(os.path.join(fake, "redis"))
        with open(os.path.join(fake, "redis", "__init__.py"), "w") as f:
            f.write("raise ImportError('no redis here')\n")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "PYTHONPATH": fake, "REDIS_URL": self.redis.url,
                                   "PORT": "0"}, capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.strip(), "llm_proxy: REDIS_URL needs the redis package: "
                                              "pip install 'llm-proxy[redis]'")
