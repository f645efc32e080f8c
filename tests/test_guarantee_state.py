"""State that never silently stops (issue 20, item 3 and the state parts of item 6): client
strings stored and reported whatever they hold, a writer that survives any error and says so
(/health, /admin/overview, /metrics), refused work that cannot grow the ledger, one proxy per
state file however it is named, a full disk reported at exit, a deleted file noticed.

Time is injected; a full disk is SQLite's own SQLITE_FULL, made with PRAGMA max_page_count."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import unittest
import unittest.mock

import llm_proxy
from llm_proxy import Config, ConfigError
from tests.support import (HERE, NO_REDIS, WAIT, ProxyTestCase, WithRedis, parse_metrics,
                           wait_until)
from tests.test_state import StateTestCase

LONE = "\ud800"  # a lone surrogate: valid JSON ("\ud800"), not encodable as UTF-8


def fill_the_disk(db: sqlite3.Connection) -> None:
    """From now on a write that needs one more page fails with SQLITE_FULL, as on a full
    disk."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


class ClientStringTests(StateTestCase):
    def test_a_lone_surrogate_in_the_model_is_stored_and_the_writer_goes_on(self):
        """The issue's case: {"model": "\\ud800"} killed the writer (UnicodeEncodeError), and
        nothing was persisted afterwards."""
        self.restart(max_tokens=100)
        self.assertEqual(self.chat(model=LONE)[0], 200)
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT model, requests FROM ledger"), [("\ufffd", 1)])
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT requests FROM counters"), [(2,)])

    def test_the_writer_thread_survives_any_error(self):
        """Whatever a write raises, the thread logs it once, keeps the rows and tries again."""
        self.restart(max_tokens=100, state_flush_seconds=0.01)
        calls = []
        real_write = self.proxy.state.write

        def write(*args):
            calls.append(1)
            if len(calls) <= 3:
                raise RuntimeError("something unforeseen")
            return real_write(*args)
        with unittest.mock.patch.object(self.proxy.state, "write", write):
            self.chat()
            self.assertTrue(wait_until(lambda: len(calls) >= 5))
        self.assertTrue(self.proxy.writer._thread.is_alive())
        self.assertEqual(self.log.getvalue().count("something unforeseen"), 1)
        self.assertTrue(wait_until(lambda: self.rows("SELECT requests FROM counters") == [(1,)]))

    def test_without_a_state_file_the_csv_report_takes_any_model_name(self):
        self.restart(state_db="off")
        self.chat(model=LONE)
        self.chat(model="a\x1fb\nc")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        status, _, body = self.request("GET", "/admin/usage?format=csv&by=model", key=None)
        self.assertEqual(status, 200, body)
        rows = list(csv.DictReader(io.StringIO(body.decode())))
        self.assertEqual(sorted(r["model"] for r in rows), ["a\ufffdb\nc", "\ufffd"])

    def test_token_counts_beyond_sqlites_integers(self):
        """MAX_TOKENS above SQLite's integer range killed the writer; so could an upstream
        reporting absurd usage. Settings are bounded; what is stored saturates."""
        for name in ("MAX_TOKENS", "REFILL_TOKENS", "TOKENS_PER_DAY"):
            with self.subTest(name=name), self.assertRaises(ConfigError) as caught:
                Config.from_env({name: str(2 ** 63)}, [])
            self.assertIn(f"{name} must be at most", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:  # and the same in a keys file
            llm_proxy.key_policies([{"name": "a", "key": "sk-a", "max_tokens": 2 ** 63}],
                                   Config())
        self.assertIn("max_tokens must be a whole number from 1 to", str(caught.exception))
        self.restart(max_tokens=100)
        self.proxy.store.settle("key:huge", 0, self.proxy.config.bucket_policy,
                                completion=10 ** 30)
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT completion_tokens FROM counters"), [(2 ** 63 - 1,)])

    def test_a_flush_interval_beyond_what_a_timer_takes(self):
        """STATE_FLUSH_SECONDS=1e12 killed the writer (OverflowError on its timer)."""
        with self.assertRaises(ConfigError):
            Config.from_env({"STATE_FLUSH_SECONDS": "1e12"}, [])
        with self.assertRaises(ConfigError):  # (nor does a Config take it)
            Config(state_flush_seconds=1e12)
        self.restart(max_tokens=100, state_flush_seconds=llm_proxy.MAX_FLUSH_SECONDS)
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        self.assertTrue(self.proxy.writer._thread.is_alive())
        self.assertTrue(self.proxy.writer.flush())


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisClientStringTests(WithRedis, ProxyTestCase):
    def test_the_redis_ledger_takes_a_lone_surrogate_and_a_separator(self):
        client = self.redis.client()
        self.addCleanup(client.close)
        client.flushall()
        self.restart(redis_url=self.redis.url)
        for model in (LONE, "x\x1fy"):
            self.chat(model=model)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        self.assertTrue(self.proxy.writer.flush())
        report = json.loads(self.request("GET", "/admin/usage?by=model", key=None)[2])
        self.assertEqual(sorted((r["model"], r["requests"]) for r in report["rows"]),
                         [("x\ufffdy", 1), ("\ufffd", 1)])


class StateStatusTests(StateTestCase):
    def test_health_overview_and_metrics_say_when_state_is_not_written(self):
        self.restart(max_tokens=100)
        full = unittest.mock.Mock(side_effect=sqlite3.OperationalError("database or disk is full"))
        with unittest.mock.patch.object(self.proxy.state, "write", full):
            self.chat()
            self.assertFalse(self.proxy.writer.flush())
            self.wall.advance(30)
            health = json.loads(self.request("GET", "/health")[2])
            self.assertEqual(health["state"], {"written": False, "failing_seconds": 30})
            store = json.loads(self.request("GET", "/admin/overview", key=None)[2])["store"]
            self.assertEqual(store["state"], {"written": False, "failing_seconds": 30,
                                              "problem": "database or disk is full"})
            metrics = parse_metrics(self.request("GET", "/metrics", key=None)[2].decode())
            self.assertEqual(metrics[("llm_proxy_state_written", ())], 0)
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(json.loads(self.request("GET", "/health")[2])["state"],
                         {"written": True, "failing_seconds": 0})
        metrics = parse_metrics(self.request("GET", "/metrics", key=None)[2].decode())
        self.assertEqual(metrics[("llm_proxy_state_written", ())], 1)


class RefusalLedgerTests(StateTestCase):
    def test_refused_requests_add_one_row_per_key_and_hour(self):
        """The issue's case: an empty bucket's refusals added a row per invented model."""
        self.restart(max_tokens=1)
        self.chat()
        for i in range(40):
            self.chat(model=f"invented-{i}")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 41))
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT COUNT(*), SUM(requests), SUM(limited_requests) "
                                   "FROM ledger WHERE limited_requests > 0"), [(1, 40, 40)])
        self.assertEqual(self.rows("SELECT COUNT(*) FROM ledger"), [(2,)])

    def test_distinct_models_per_key_and_hour_are_capped(self):
        cap = llm_proxy.MAX_MODELS_PER_KEY_HOUR
        self.restart(max_tokens=10 ** 6)
        for i in range(cap + 10):
            self.chat(model=f"m{i}")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == cap + 10))
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT COUNT(*), SUM(requests) FROM ledger"),
                         [(cap + 1, cap + 10)])
        self.assertEqual(self.rows(f"SELECT requests FROM ledger WHERE model = "
                                   f"'{llm_proxy.OTHER_MODELS}'"), [(10,)])
        self.wall.advance(3600)  # a new hour: its own models
        self.chat(model="m-next-hour")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == cap + 11))
        self.assertTrue(self.proxy.writer.flush())
        self.assertEqual(self.rows("SELECT COUNT(*) FROM ledger WHERE model = 'm-next-hour'"),
                         [(1,)])


class StateLockTests(StateTestCase):
    def test_a_link_to_the_state_file_is_the_same_file(self):
        """The issue's case: a symlink let two proxies share one file (a 5-token bucket
        admitted 10). A hard link is the same file too."""
        self.restart()  # this one holds the file
        symlink, hardlink = (os.path.join(self.folder, name) for name in ("sym.db", "hard.db"))
        os.symlink(self.path, symlink)
        os.link(self.path, hardlink)
        for path in (symlink, hardlink):
            with self.subTest(path=path), self.assertRaises(ConfigError) as caught:
                self.start_proxy(state_db=path)
            self.assertIn("is in use by another llm_proxy", str(caught.exception))

    def test_the_lock_is_not_opened_through_a_link(self):
        self.stop()
        victim = os.path.join(self.folder, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious")
        os.symlink(victim, self.path + ".lock")
        with self.assertRaises(ConfigError):
            self.start_proxy()
        with open(victim) as f:
            self.assertEqual(f.read(), "precious")


#: A proxy process whose disk fills once it has started (SQLite's SQLITE_FULL).
FULL_DISK_PROXY = """
import sys
import llm_proxy
opened = llm_proxy.StateFile.__init__
def open_then_fill(self, path):
    opened(self, path)
    pages = self.db.execute("PRAGMA page_count").fetchone()[0]
    self.db.execute(f"PRAGMA max_page_count = {pages}")
llm_proxy.StateFile.__init__ = open_then_fill
sys.exit(llm_proxy.main())
"""


class DiskFullTests(StateTestCase):
    def spend(self, keys, proxy=None):
        """Requests from `keys` different keys (open mode: a bucket each, pages of rows)."""
        for i in range(keys):
            self.assertEqual(self.chat(key=f"sk-disk-full-{i:04d}", proxy=proxy)[0], 200)

    def test_the_warning_keeps_sqlite_full(self):
        """The warning showed the ROLLBACK's error instead of SQLITE_FULL."""
        self.restart(max_tokens=5)
        fill_the_disk(self.proxy.state.db)
        self.spend(60)
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 60))
        self.assertFalse(self.proxy.writer.flush())
        self.assertIn("database or disk is full", self.log.getvalue())
        self.assertNotIn("rollback", self.log.getvalue().lower())

    def test_sigterm_with_a_full_disk_says_what_was_not_written_and_exits_non_zero(self):
        """A SIGTERM exited 0 and dropped what it could not write."""
        self.stop()
        env = {**os.environ, "STATE_DB": self.path, "PORT": "0", "HOST": "127.0.0.1",
               "BASE_API_URL": self.upstream.url, "MAX_TOKENS": "5",
               "STATE_FLUSH_SECONDS": "3600", "PYTHONPATH": HERE}
        proc = subprocess.Popen([sys.executable, "-c", FULL_DISK_PROXY], env=env, cwd=HERE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        self.spend(60, proxy=type("P", (), {"server_address": ("127.0.0.1", port)}))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
        self.assertNotEqual(proc.returncode, 0, err)
        self.assertIn("could not be written", err)
        self.assertIn("database or disk is full", err)
        self.assertRegex(err, r"60 balances")


class DeletedStateTests(StateTestCase):
    def test_a_deleted_state_file_is_noticed_and_said(self):
        """The issue's case: the file deleted while running, no warning, and a restart
        refilled every bucket."""
        self.restart(max_tokens=5)
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        self.assertTrue(self.proxy.writer.flush())
        os.remove(self.path)
        self.chat()
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == 2))
        self.assertFalse(self.proxy.writer.flush())
        self.assertIn(f"warning: {self.path} cannot be written (the path no longer names the "
                      "file this proxy writes (deleted or replaced)", self.log.getvalue())
        self.assertEqual(json.loads(self.request("GET", "/health")[2])["state"],
                         {"written": False, "failing_seconds": 0})
        status, _, body = self.request("GET", "/admin/overview", key=None)
        self.assertEqual(status, 200, body)  # the dashboard says so, and still counts both
        self.assertEqual(json.loads(body)["store"]["state"]["written"], False)
        usage = json.loads(self.request("GET", "/v1/usage")[2])["usage"]["today"]["total"]
        self.assertEqual(usage["requests"], 2)
        self.assertFalse(self.proxy.writer.flush())  # (and so on, until the proxy stops)
        self.stop()
        self.assertIn("could not be written", self.log.getvalue())
