"""State that outlives the process (STATE_DB), calendar quotas, the usage ledger and its
reports. Time is injected: a monotonic clock for buckets, a wall clock for days and months."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import unittest
import unittest.mock

import llm_proxy
from llm_proxy import Config, ConfigError, ProxyServer
from tests.support import HERE, WAIT, FakeClock, ProxyTestCase, wait_until

BERLIN = datetime.timezone(datetime.timedelta(hours=1))  # Europe/Berlin in winter (CET)


def berlin(*args):
    """A wall-clock time given as a date and time in Berlin (winter)."""
    return datetime.datetime(*args, tzinfo=BERLIN).timestamp()


class StateTestCase(ProxyTestCase):
    """Proxies that keep their state in a file of the test's own folder, on injected clocks."""

    def setUp(self):
        super().setUp()
        self.folder = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.folder, ignore_errors=True))
        self.path = os.path.join(self.folder, "state.db")
        self.wall = FakeClock(berlin(2026, 12, 1, 12, 0))

    def start_proxy(self, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        settings.setdefault("state_db", getattr(self, "path", "off"))
        config = Config(host="127.0.0.1", port=0, **settings)
        proxy = ProxyServer(config, clock=self.clock, wall=getattr(self, "wall", FakeClock()),
                            log_stream=self.log)
        self._serve(proxy)
        return proxy

    def stop(self, proxy=None):
        """Stop a proxy the way SIGTERM does: its state is written one last time."""
        proxy = proxy or self.proxy
        proxy.shutdown()
        proxy.server_close()

    def rows(self, query):
        with sqlite3.connect(self.path) as db:
            return db.execute(query).fetchall()


class RestartTests(StateTestCase):
    def test_a_restart_continues_where_the_process_left_off(self):
        """The issue's case: a key at 0 of 5 with 7 requests counted came back at 5 of 5 with
        0 requests; now it comes back as it was."""
        self.restart(max_tokens=5)
        for _ in range(7):
            self.chat()
        self.assertEqual(self.remaining(), 0)
        self.stop()
        self.restart(max_tokens=5)
        self.assertEqual(self.remaining(), 0)
        status, _, body = self.request("GET", "/health")
        self.assertEqual(json.loads(body)["usage"]["requests"], 7)
        self.assertEqual(json.loads(body)["usage"]["limited_requests"], 2)

    def test_a_refill_due_during_the_downtime_is_applied_as_the_grid_says(self):
        self.restart(max_tokens=10, refill_tokens=2, refill_interval_seconds=300)
        for _ in range(10):
            self.chat()
        self.stop()
        self.wall.advance(700)  # two refills fall due while the proxy is down
        self.clock.now = 5.0    # (a new process: its monotonic clock starts anywhere)
        self.restart(max_tokens=10, refill_tokens=2, refill_interval_seconds=300)
        self.assertEqual(self.remaining(), 4)  # not a fresh bucket
        status, headers, _ = self.request("GET", "/health")
        self.assertEqual(json.loads(_)["quota"]["reset_seconds"], 200)  # the same grid

    def test_a_debt_survives_a_restart(self):
        self.restart(token_cost_mode="usage", max_tokens=20, response_token_reserve=1)
        self.chat()  # the fake reports more than the reservation: a debt
        self.assertLess(self.remaining(), 20)
        owed = self.remaining()
        self.stop()
        self.restart(token_cost_mode="usage", max_tokens=20, response_token_reserve=1)
        self.assertEqual(self.remaining(), owed)

    def test_killed_at_most_the_last_flush_interval_is_lost(self):
        """kill -9 after known traffic: the restarted balances and counts are the truth, less
        at most what happened in the last flush interval."""
        env = {**os.environ, "STATE_DB": self.path, "PORT": "0", "HOST": "127.0.0.1",
               "BASE_API_URL": self.upstream.url, "MAX_TOKENS": "100",
               "STATE_FLUSH_SECONDS": "1"}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_proxy.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        proxy = type("P", (), {"server_address": ("127.0.0.1", port)})
        for _ in range(5):
            self.assertEqual(self.chat(proxy=proxy)[0], 200)
        flushed = lambda: self.rows("SELECT requests FROM counters") == [(5,)]  # noqa: E731
        self.assertTrue(wait_until(flushed))  # written within a flush interval
        for _ in range(3):  # and three more that the next flush may or may not take
            self.chat(proxy=proxy)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        self.restart(max_tokens=100)
        counted = json.loads(self.request("GET", "/health")[2])["usage"]["requests"]
        self.assertIn(counted, range(5, 9))
        self.assertEqual(self.remaining(), 100 - counted)  # balance and counts agree

    def test_one_process_per_state_file(self):
        self.restart()  # this one holds the file
        with self.assertRaises(ConfigError) as caught:
            self.start_proxy()
        self.assertIn("is in use by another llm_proxy (pid", str(caught.exception))
        self.assertIn(self.path, str(caught.exception))
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "STATE_DB": self.path, "PORT": "0"},
                              capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)

    def test_the_default_file_is_under_the_state_folder_and_names_the_port(self):
        self.assertEqual(llm_proxy.default_state_path(8899, {"XDG_STATE_HOME": "/var/st"}),
                         "/var/st/llm_proxy/state-8899.db")
        self.assertTrue(llm_proxy.default_state_path(8900, {"HOME": "/h"}).endswith(
            "/.local/state/llm_proxy/state-8900.db"))
        self.assertEqual(llm_proxy.state_path(Config(state_db="off")), "")
        self.assertEqual(llm_proxy.state_path(Config(state_db="OFF")), "")


class BadStateTests(StateTestCase):
    def setUp(self):
        super().setUp()
        self.stop()
        for suffix in ("", "-wal", "-shm"):  # each test starts from a file of its own
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)

    def refused(self, path):
        """The proxy started on `path` stops with one line naming it: exit status 2."""
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llm_proxy.py")],
                              env={**os.environ, "STATE_DB": path, "PORT": "0"},
                              capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn(path, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        return proc.stderr

    def test_a_corrupt_file(self):
        with open(self.path, "wb") as f:
            f.write(b"this is not a database, not at all" * 100)
        self.assertIn("not a readable llm_proxy state file", self.refused(self.path))

    def test_a_folder_that_cannot_be_made(self):
        blocker = os.path.join(self.folder, "a-file")
        open(blocker, "w").close()
        self.assertIn("cannot be created", self.refused(os.path.join(blocker, "state.db")))

    def test_a_file_of_a_newer_version(self):
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA user_version = 99")
        self.assertIn("written by a newer llm_proxy", self.refused(self.path))

    def test_an_old_file_is_migrated(self):
        with sqlite3.connect(self.path) as db:  # version 0: an empty database
            db.execute("CREATE TABLE unrelated (x)")
        self.restart()
        self.assertEqual(self.rows("PRAGMA user_version"), [(llm_proxy.SCHEMA_VERSION,)])
        self.chat()
        self.stop()
        self.assertEqual(self.rows("SELECT requests FROM counters"), [(1,)])

    def test_a_failing_disk_is_logged_once_and_caught_up(self):
        """Disk full at run time: requests go on from memory, one warning per outage, and
        what could not be written is written once the disk takes it again."""
        self.restart(max_tokens=100)
        writer = self.proxy.writer
        full = unittest.mock.Mock(side_effect=sqlite3.OperationalError("database or disk is full"))
        with unittest.mock.patch.object(self.proxy.state, "write", full):
            for count in range(1, 4):
                self.assertEqual(self.chat()[0], 200)
                self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") == count))
                self.assertFalse(writer.flush())
        self.assertEqual(self.log.getvalue().count("cannot be written (database or disk is full)"),
                         1)
        self.assertTrue(writer.flush())
        self.assertIn("is written again", self.log.getvalue())
        self.assertEqual(self.rows("SELECT requests FROM counters"), [(3,)])
        self.assertEqual(self.rows("SELECT SUM(requests) FROM ledger"), [(3,)])


class CalendarQuotaTests(StateTestCase):
    """Days and months turn over at midnight in QUOTA_TIMEZONE, on the injected wall clock."""

    def start_proxy(self, **settings):
        settings.setdefault("quota_timezone", "Europe/Berlin")
        settings.setdefault("max_tokens", 1000)
        return super().start_proxy(**settings)

    def test_a_daily_quota_turns_over_at_midnight_in_its_zone(self):
        self.wall.now = berlin(2026, 12, 1, 23, 0)  # 22:00 UTC: still Dec 1 in both
        self.restart(tokens_per_day=3)
        for _ in range(3):
            status, headers, _ = self.chat()
        self.assertEqual((headers["x-ratelimit-limit-tokens-day"],
                          headers["x-ratelimit-remaining-tokens-day"],
                          headers["x-ratelimit-reset-tokens-day"]), ("3", "0", "3600"))
        status, headers, body = self.chat()
        text = json.loads(body)["choices"][0]["message"]["content"]
        self.assertEqual(text, "daily limit reached, resets in 1 h")
        self.assertEqual(headers["retry-after"], "3600")  # the real wait
        self.assertEqual(self.remaining(), 1000 - 3)  # a refused request is charged nothing
        self.wall.now = berlin(2026, 12, 2, 0, 0, 1)  # 23:00:01 UTC: a new day in Berlin only
        self.assertEqual(self.chat()[0], 200)
        self.assertEqual(self.remaining(), 1000 - 4)

    def test_a_monthly_quota_turns_over_at_the_month_end(self):
        self.wall.now = berlin(2027, 1, 31, 23, 30)
        self.restart(tokens_per_month=2, limit_response="429")
        self.chat()
        self.chat()
        status, headers, body = self.chat()
        self.assertEqual(status, 429)
        self.assertIn("monthly limit reached, resets in 30 min", json.loads(body)["error"]["message"])
        self.assertEqual(headers["retry-after"], "1800")
        self.wall.now = berlin(2027, 2, 1, 0, 0)
        self.assertEqual(self.chat()[0], 200)

    def test_requests_per_day_and_the_longest_wait_is_named(self):
        self.restart(requests_per_day=2, tokens_per_day=1000, limit_response="429")
        self.chat()
        self.chat()
        status, headers, body = self.chat()
        self.assertIn("daily request limit reached, resets in 12 h",
                      json.loads(body)["error"]["message"])
        self.assertEqual(headers["x-should-retry"], "false")  # longer than the SDK waits

    def test_bucket_and_quotas_admit_atomically(self):
        self.restart(tokens_per_day=10, max_tokens=1000)
        threads = [threading.Thread(target=self.chat) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(len(self.upstream.requests), 10)  # exactly the quota, never more
        self.assertEqual(self.remaining(), 1000 - 10)

    def test_usage_mode_settles_quotas_with_what_was_used(self):
        self.restart(token_cost_mode="usage", tokens_per_day=100_000, response_token_reserve=50)
        self.chat()
        used = self.upstream.reported[-1]
        self.assertTrue(self.log.wait_for(lambda text: f"cost={used} " in text))
        quotas = json.loads(self.request("GET", "/v1/usage")[2])["quotas"]
        self.assertEqual([(q["name"], q["used"]) for q in quotas], [("tokens_per_day", used)])

    def test_quotas_survive_a_restart_and_come_from_the_keys_file(self):
        keys = os.path.join(self.folder, "keys.json")
        with open(keys, "w") as f:
            json.dump({"keys": [{"name": "alice", "key": "sk-alice", "tokens_per_day": 2},
                                {"name": "bob", "key": "sk-bob", "tokens_per_day": None}]}, f)
        self.restart(keys_file=keys, tokens_per_day=1)
        self.chat(key="sk-alice")
        self.stop()
        self.restart(keys_file=keys, tokens_per_day=1)
        self.assertEqual(self.chat(key="sk-alice")[0], 200)
        self.assertIn(b"daily limit reached", self.chat(key="sk-alice")[2])
        for _ in range(3):  # null: no daily quota for bob, whatever the default says
            self.assertNotIn(b"limit reached", self.chat(key="sk-bob")[2])


class LedgerTests(StateTestCase):
    def setUp(self):
        super().setUp()
        keys = os.path.join(self.folder, "keys.json")
        with open(keys, "w") as f:
            json.dump({"keys": [{"name": "alice", "key": "sk-alice"},
                                {"name": "bob", "key": "sk-bob"}]}, f)
        self.restart(token_cost_mode="usage", max_tokens=100_000, response_token_reserve=50,
                     keys_file=keys)

    def traffic(self):
        """A known mix: Alice chats twice on one model and streams once on another, Bob
        embeds once; an hour passes in between."""
        self.chat(key="sk-alice", model="m1")
        self.chat(key="sk-alice", model="m1", stream=True)
        self.wall.advance(3600)
        self.chat(key="sk-alice", model="m2")
        self.request("POST", "/v1/embeddings", {"model": "e1", "input": "some text"},
                     key="sk-bob")
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= 4))

    def test_the_ledger_totals_are_what_was_charged(self):
        self.traffic()
        self.proxy.writer.flush()
        charged = sum(self.upstream.reported)
        self.assertEqual(self.rows("SELECT SUM(tokens_charged), SUM(requests) FROM ledger"),
                         [(charged, 4)])
        self.assertEqual(self.rows("SELECT COUNT(DISTINCT hour) FROM ledger"), [(2,)])

    def test_the_report_command_reads_the_file_while_the_proxy_runs(self):
        self.traffic()
        self.proxy.writer.flush()
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "llm_proxy.py"), "usage", "--by", "model",
             "--format", "csv", "--since", "2026-12-01", "--state-db", self.path],
            env={**os.environ, "QUOTA_TIMEZONE": "UTC"}, capture_output=True, text=True,
            timeout=WAIT)
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = list(csv.DictReader(io.StringIO(out.stdout)))
        self.assertEqual([r["model"] for r in rows], ["e1", "m1", "m2"])
        self.assertEqual([int(r["requests"]) for r in rows], [1, 2, 1])
        self.assertEqual(sum(int(r["tokens_charged"]) for r in rows), sum(self.upstream.reported))
        table = subprocess.run(
            [sys.executable, os.path.join(HERE, "llm_proxy.py"), "usage", "--since",
             "2026-12-01", "--state-db", self.path], capture_output=True, text=True,
            timeout=WAIT).stdout
        self.assertRegex(table, r"(?m)^key\s+requests\s+limited_requests")
        self.assertRegex(table, r"(?m)^total\s+4\s")

    def test_admin_usage_by_day_in_json_and_csv(self):
        self.traffic()
        status, headers, body = self.request("GET", "/admin/usage?by=day&since=2026-12-01",
                                             key=None)
        self.assertEqual(status, 200)
        report = json.loads(body)
        self.assertEqual([row["day"] for row in report["rows"]], ["2026-12-01"])
        self.assertEqual(report["rows"][0]["requests"], 4)
        status, headers, body = self.request("GET", "/admin/usage?by=key&format=csv&key=alice",
                                             key=None)
        self.assertEqual(headers["content-type"], "text/csv; charset=utf-8")
        rows = list(csv.DictReader(io.StringIO(body.decode())))
        self.assertEqual([(r["key"], r["requests"]) for r in rows], [("alice", "3")])
        self.assertEqual(self.request("GET", "/admin/usage?by=week", key=None)[0], 400)

    def test_v1_usage_shows_each_key_only_its_own(self):
        self.traffic()
        alice = json.loads(self.request("GET", "/v1/usage", key="sk-alice")[2])
        bob = json.loads(self.request("GET", "/v1/usage", key="sk-bob")[2])
        self.assertEqual(alice["key"], "alice")
        self.assertEqual(sorted(alice["usage"]["this_month"]["by_model"]), ["m1", "m2"])
        self.assertEqual(sorted(alice["usage"]["today"]["by_model"]), ["m1", "m2"])
        self.assertEqual(alice["usage"]["this_month"]["total"]["requests"], 3)
        self.assertEqual(sorted(bob["usage"]["this_month"]["by_model"]), ["e1"])
        self.assertEqual(set(bob["bucket"]), {"limit", "balance", "next_refill_seconds",
                                              "refill_tokens", "refill_interval_seconds"})
        self.assertEqual(self.request("GET", "/v1/usage", key=None)[0], 401)
        self.assertEqual(self.request("GET", "/v1/usage", key="sk-mallory")[0], 401)
