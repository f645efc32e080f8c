"""The pages: the operator's dashboard (GET /admin) and a key holder's usage page (GET /usage).

First what they read (GET /admin/overview, as any route: after a known sequence of requests on
an injected wall clock), who may read it, and how the pages are served; then the pages
themselves in a real headless Chromium (tests/browser.py), skipped with the reason when none
is installed.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import shutil
import tempfile
import threading
import types
import unittest

import llm_proxy
from llm_proxy import Config, Metrics, ProxyServer, RecentMinutes

from tests.support import FakeClock, ProxyTestCase, WAIT, free_port, wait_until

ALICE, BOB, ADMIN = "sk-alice-SECRET-1111", "sk-bob-SECRET-2222", "sk-admin-SECRET-3333"
XSS = "<img src=x onerror=alert(1)>"
NOON = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc).timestamp()


class PagesTestCase(ProxyTestCase):
    """A proxy with a keys file (alice: 3 tokens and 5 a day; bob), on a wall clock at noon."""

    NOW = NOON  # where the wall clock starts

    def setUp(self):
        self.wall = FakeClock(now=self.NOW)
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.keys_path = os.path.join(self.tmp, "keys.json")
        with open(self.keys_path, "w") as f:
            json.dump({"keys": [{"name": "alice", "key": ALICE, "max_tokens": 3,
                                 "tokens_per_day": 5},
                                {"name": XSS, "key": BOB}]}, f)
        self.restart(keys_file=self.keys_path)

    def start_proxy(self, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        settings.setdefault("state_db", "off")
        proxy = ProxyServer(Config(host="127.0.0.1", port=0, **settings), clock=self.clock,
                            wall=self.wall, log_stream=self.log)
        self._serve(proxy)
        return proxy

    def overview(self, key=None, headers=None):
        status, reply_headers, body = self.request("GET", "/admin/overview", key=key,
                                                   headers=headers)
        self.assertEqual(status, 200, body)
        self.assertEqual(reply_headers["cache-control"], "no-store")
        return json.loads(body)

    def settled(self, count):
        self.assertTrue(self.log.wait_for(lambda text: text.count(" cost=") >= count))


class OverviewTests(PagesTestCase):
    def test_after_a_known_sequence(self):
        for _ in range(4):
            self.chat(key=ALICE)  # 3 admitted (1 token each), the 4th limited
        self.chat(key=BOB, headers={"X-Fake-Scenario": "status-503"}, model=XSS)
        self.chat(key=BOB)
        self.settled(6)
        report = self.overview()
        self.assertEqual(report["version"], llm_proxy.__version__)
        self.assertEqual(report["now"], "2026-12-01T12:00:00+00:00")
        alice, bob = report["keys"]
        self.assertEqual((alice["name"], bob["name"]), ("alice", XSS))
        self.assertEqual((alice["limit"], alice["balance"], alice["next_refill_seconds"]),
                         (3, 0, 300))
        self.assertEqual(alice["today"], {"tokens": 3, "requests": 4, "limited": 1})
        self.assertEqual(alice["this_month"], alice["today"])
        self.assertEqual(alice["quotas"], [{"name": "tokens_per_day", "limit": 5, "used": 3,
                                            "remaining": 2, "resets_in_seconds": 12 * 3600}])
        self.assertEqual(bob["today"], {"tokens": 1, "requests": 2, "limited": 0})  # 503: refunded
        self.assertEqual((bob["in_flight"], bob["waiting"], bob["quotas"]), (0, 0, []))
        upstream = report["upstream"]
        self.assertTrue(upstream["reachable"])
        self.assertEqual(upstream["errors_last_hour"],
                         {"timeout": 0, "refused": 0, "5xx": 1, "broken": 0, "invalid": 0})
        self.assertEqual(upstream["ttfb_ms"]["count"], 5)
        self.assertLessEqual(upstream["ttfb_ms"]["p50"], upstream["ttfb_ms"]["p95"])
        self.assertEqual(upstream["url"], self.upstream.url)
        minutes = report["requests_per_minute"]
        self.assertEqual(len(minutes["minutes"]), 60)
        self.assertEqual(minutes["start"], "2026-12-01T11:01:00+00:00")
        self.assertEqual(minutes["minutes"][-1], {"requests": 6, "limited": 1, "errors": 1})
        self.assertEqual(sum(m["requests"] for m in minutes["minutes"]), 6)
        days = report["tokens_per_day"]
        self.assertEqual((len(days["days"]), days["days"][0], days["days"][-1]),
                         (30, "2026-11-02", "2026-12-01"))
        self.assertEqual({k["name"]: k["tokens"][-1] for k in days["keys"]},
                         {"alice": 3, XSS: 1})
        self.assertEqual(report["models"], [  # (refusals count under one name: issue 20)
            {"name": "fake-a", "today": {"tokens": 4, "requests": 4},
             "this_month": {"tokens": 4, "requests": 4}},
            {"name": llm_proxy.LIMITED_MODELS, "today": {"tokens": 0, "requests": 1},
             "this_month": {"tokens": 0, "requests": 1}},
            {"name": XSS, "today": {"tokens": 0, "requests": 1},
             "this_month": {"tokens": 0, "requests": 1}}])
        self.assertEqual(report["store"], {"kind": "memory", "state_file": None, "redis": None,
                                           "ok": True, "buckets_held": 2})
        raw = json.dumps(report)
        for secret in (ALICE, BOB, llm_proxy.key_digest(ALICE)):
            self.assertNotIn(secret, raw)

    def test_days_and_minutes_move_with_the_clock(self):
        self.chat(key=ALICE)
        self.settled(1)
        self.wall.advance(2 * 86400 + 61)
        self.chat(key=BOB)
        self.settled(2)
        report = self.overview()
        days = report["tokens_per_day"]
        self.assertEqual(days["days"][-1], "2026-12-03")
        tokens = {k["name"]: k["tokens"] for k in days["keys"]}
        self.assertEqual((tokens["alice"][27], tokens["alice"][29], tokens[XSS][29]), (1, 0, 1))
        alice = report["keys"][0]
        self.assertEqual((alice["today"]["tokens"], alice["this_month"]["tokens"]), (0, 1))
        self.assertEqual([m["requests"] for m in report["requests_per_minute"]["minutes"]],
                         [0] * 59 + [1])  # the first request is more than an hour ago

    def test_requests_in_flight_and_waiting_for_their_turn(self):
        self.restart(keys_file=self.keys_path, max_upstream_concurrency=1)
        conn = self.stream_as(ALICE, "gate")
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) == 1))  # alice's turn
        waiting = threading.Thread(target=self.chat, kwargs={"key": BOB})
        waiting.start()
        self.assertTrue(wait_until(lambda: self.proxy.gate.waiting() == 1))
        report = self.overview()
        alice, bob = report["keys"]
        self.assertEqual((alice["in_flight"], alice["waiting"]), (1, 0))
        self.assertEqual((bob["in_flight"], bob["waiting"]), (0, 1))
        self.assertEqual((report["upstream"]["in_flight"], report["upstream"]["waiting"]), (1, 1))
        self.upstream.release.set()
        conn.getresponse().read()
        waiting.join(WAIT)
        self.settled(2)
        alice, bob = self.overview()["keys"]
        self.assertEqual((alice["in_flight"], bob["waiting"]), (0, 0))

    def stream_as(self, key, scenario):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1],
                                          timeout=WAIT)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
            {"Authorization": f"Bearer {key}", "X-Fake-Scenario": scenario})
        return conn

    def test_an_upstream_that_cannot_be_reached(self):
        self.restart(keys_file=self.keys_path,
                     base_api_url=f"http://127.0.0.1:{free_port()}/v1", open_timeout=1)
        self.chat(key=ALICE)
        self.settled(1)
        upstream = self.overview()["upstream"]
        self.assertEqual((upstream["reachable"], upstream["connect_ms"]), (False, None))
        self.assertEqual(upstream["errors_last_hour"]["refused"], 1)
        self.assertEqual(upstream["ttfb_ms"], {"p50": None, "p95": None, "count": 0})

    def test_open_mode_lists_the_keys_seen(self):
        self.restart()
        self.chat(key="sk-anyone-1")
        self.settled(1)
        names = [k["name"] for k in self.overview()["keys"]]
        self.assertEqual(names, [llm_proxy.short_hash(llm_proxy.key_digest("sk-anyone-1"))])

    def test_the_store_says_where_the_state_is_kept(self):
        path = os.path.join(self.tmp, "state.db")
        self.restart(keys_file=self.keys_path, state_db=path)
        self.chat(key=ALICE)
        self.settled(1)
        self.assertEqual(self.overview()["store"], {"kind": "memory", "state_file": path,
                                                    "redis": None, "ok": True,
                                                    "buckets_held": 1,
                                                    "state": {"written": True,
                                                              "failing_seconds": 0,
                                                              "problem": None}})
        self.proxy.shutdown()
        self.proxy.server_close()  # (the last write of the state file)
        self.restart(keys_file=self.keys_path, state_db=path)  # the ledger outlives the process
        self.assertEqual(self.overview()["keys"][0]["today"],
                         {"tokens": 1, "requests": 1, "limited": 0})

    def test_a_key_seen_only_in_flight_is_named_by_its_short_hash(self):
        self.restart()
        conn = self.stream_as("sk-anyone-2", "gate")
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) == 1))
        body = json.dumps(self.overview())
        digest = llm_proxy.key_digest("sk-anyone-2")
        self.assertIn(llm_proxy.short_hash(digest), body)
        self.assertNotIn(digest, body)
        self.upstream.release.set()
        conn.getresponse().read()

    def test_a_half_hour_time_zone_counts_an_hour_on_one_day_everywhere(self):
        """In Asia/Kolkata (UTC+5:30) the UTC hour from 23:30 to 00:30 local ends today: the
        key's today and the chart's today bar agree on it."""
        self.wall.now = datetime.datetime(2026, 12, 1, 18, 40,  # 00:10 on Dec 2 in Kolkata
                                          tzinfo=datetime.timezone.utc).timestamp()
        self.restart(keys_file=self.keys_path, quota_timezone="Asia/Kolkata")
        self.chat(key=ALICE)
        self.settled(1)
        report = self.overview()
        chart = {k["name"]: k["tokens"] for k in report["tokens_per_day"]["keys"]}
        self.assertEqual(report["tokens_per_day"]["days"][-1], "2026-12-02")
        self.assertEqual((report["keys"][0]["today"]["tokens"], chart["alice"][-1]), (1, 1))

    def test_reading_it_costs_nothing_and_holds_no_bucket(self):
        for _ in range(3):
            self.overview()
            self.assertEqual(self.request("GET", "/v1/usage", key=ALICE)[0], 200)
        self.assertEqual(len(self.proxy.store), 0)
        self.assertEqual(self.upstream.requests, [])


class ReportTests(unittest.TestCase):
    def test_the_store_report_names_redis_without_its_password(self):
        class Store:  # (a Redis store that cannot reach Redis, in local failure mode)
            def status(self):
                return {"backend": "redis", "reachable": False, "failure_mode": "local"}

            def __len__(self):
                return 0
        server = types.SimpleNamespace(
            config=Config(redis_url="redis://user:pw-SECRET@db.lan:6380/2"), state=None,
            writer=None, store=Store())
        report = llm_proxy.store_report(server)
        self.assertEqual(report["redis"], {"url": "redis://db.lan:6380/2", "reachable": False})
        self.assertTrue(report["ok"])  # local failure mode: requests still served
        self.assertNotIn("SECRET", json.dumps(report))

    def test_a_bucket_is_named_by_its_short_hash_or_its_address(self):
        digest = llm_proxy.key_digest("sk-x")
        self.assertEqual(llm_proxy.bucket_name("key:" + digest), llm_proxy.short_hash(digest))
        self.assertEqual(llm_proxy.bucket_name("ip:203.0.113.9"), "203.0.113.9")


class RecentMinutesTests(unittest.TestCase):
    def test_the_last_hour_minute_by_minute(self):
        wall = FakeClock(now=NOON)
        recent = RecentMinutes(wall)
        recent.add("requests")
        wall.advance(59)
        recent.add("requests", 2)
        wall.advance(1)
        recent.add("upstream timeout")
        first, minutes = recent.window()
        self.assertEqual(first, int(NOON // 60) - 58)
        self.assertEqual(minutes[-2:], [{"requests": 3, "limited": 0, "errors": 0},
                                        {"requests": 0, "limited": 0, "errors": 0,
                                         "upstream timeout": 1}])
        wall.advance(59 * 60)
        self.assertEqual(recent.window()[1][0]["upstream timeout"], 1)
        wall.advance(60)
        self.assertEqual(recent.window()[1], [{}] * 60)


class QuantileTests(unittest.TestCase):
    def test_interpolated_within_buckets_as_prometheus_does(self):
        metrics = Metrics()
        self.assertEqual(metrics.quantiles("h", 0.5), ((None,), 0))
        for seconds in (0.02, 0.03, 0.04, 0.2):  # buckets 0.01-0.025, 0.025-0.05 x2, 0.1-0.25
            metrics.observe("h", seconds)
        (p50, p95), count = metrics.quantiles("h", 0.5, 0.95)
        self.assertEqual(count, 4)
        self.assertAlmostEqual(p50, 0.025 + 0.025 * 0.5)     # rank 2: half into (0.025, 0.05]
        self.assertAlmostEqual(p95, 0.1 + 0.15 * 0.8)       # rank 3.8: 0.8 into (0.1, 0.25]
        metrics.observe("h", 500)                            # above every bound: the last bound
        self.assertEqual(metrics.quantiles("h", 1.0)[0], (120.0,))


class PageServingTests(PagesTestCase):
    PATHS = {"/admin": "text/html", "/usage": "text/html", "/ui/style.css": "text/css",
             "/ui/pages.js": "text/javascript", "/ui/admin.js": "text/javascript",
             "/ui/usage.js": "text/javascript"}

    def test_pages_and_scripts_come_with_a_policy_that_lets_nothing_else_in(self):
        for path, kind in self.PATHS.items():
            with self.subTest(path=path):
                status, headers, body = self.request("GET", path, key=None)
                self.assertEqual(status, 200)
                self.assertEqual(headers["content-type"], kind + "; charset=utf-8")
                self.assertEqual(headers["content-security-policy"],
                                 "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                 "form-action 'none'")
                self.assertEqual(headers["x-content-type-options"], "nosniff")
                self.assertEqual(headers["cache-control"], "no-store")
                self.assertTrue(body)
        for path in ("/admin", "/usage"):  # no inline script or style: the policy needs none
            html = self.request("GET", path, key=None)[2].decode()
            self.assertNotRegex(html, r"<script(?![^>]*\bsrc=)|\son[a-z]+=|style=")

    def test_with_an_admin_key_the_page_is_a_login_and_the_data_needs_the_key(self):
        self.restart(keys_file=self.keys_path, admin_api_key=ADMIN)
        far = self.far_away()
        for proxy in (self.proxy, far):
            self.assertEqual(self.request("GET", "/admin", key=None, proxy=proxy)[0], 200)
            for key in (None, ALICE, "sk-wrong"):
                self.assert_openai_error(*self.request("GET", "/admin/overview", key=key,
                                                       proxy=proxy)[::2], 401)
            self.assertEqual(self.request("GET", "/admin/overview", key=ADMIN,
                                          proxy=proxy)[0], 200)

    def test_without_an_admin_key_the_dashboard_is_for_this_machine_only(self):
        far = self.far_away()
        for path in ("/admin", "/admin/overview"):
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path, key=None)[0], 200)
                self.assert_openai_error(*self.request("GET", path, key=None,
                                                       proxy=far)[::2], 404)
        self.assertEqual(self.request("GET", "/usage", key=None, proxy=far)[0], 200)

    def test_another_name_for_this_machine_is_not_this_machine(self):
        """DNS rebinding: a page whose host name was made to resolve to 127.0.0.1 reaches the
        proxy from this machine, but under its own name; the admin routes are not for it."""
        for host in ("evil.example:8899", "127.0.0.1.evil.example", "localhost.evil"):
            for path in ("/admin", "/admin/overview", "/admin/keys", "/metrics"):
                with self.subTest(host=host, path=path):
                    self.assertEqual(self.request("GET", path, key=None,
                                                  headers={"Host": host})[0], 404)
        for host in ("localhost:8899", "127.0.0.1", "[::1]:8899", "LOCALHOST", "0.0.0.0:8899"):
            self.assertEqual(self.request("GET", "/admin/overview", key=None,
                                          headers={"Host": host})[0], 200, host)

    def test_another_site_s_page_is_refused_the_admin_routes(self):
        for site in ("cross-site", "same-site"):
            status, _, body = self.request("GET", "/admin/overview", key=None,
                                           headers={"Sec-Fetch-Site": site})
            self.assert_openai_error(status, body, 403, "origin_not_allowed")
        for site in ("same-origin", "none"):
            self.assertEqual(self.request("GET", "/admin/overview", key=None,
                                          headers={"Sec-Fetch-Site": site})[0], 200)

    def far_away(self):
        class FarAway(llm_proxy.ProxyHandler):
            def setup(self):
                super().setup()
                self.client_address = ("203.0.113.9", 40000)
        far = ProxyServer(self.proxy.config, log_stream=self.log, handler=FarAway)
        self._serve(far)
        return far


# ################################################################ in a real browser ####

try:
    from tests.browser import Browser, find_chromium
except ImportError:  # (a platform without fcntl)
    Browser, find_chromium = None, lambda: None
CHROMIUM = find_chromium()
#: What a browser logs by itself when an answer is 401 (a wrong key): not the page's error.
EXPECTED_401 = "Failed to load resource: the server responded with a status of 401"
CAROL = "sk-carol-SECRET-4444"


@unittest.skipIf(CHROMIUM is None, "no Chromium to run the pages in (apt-get install chromium, "
                                    "or set BROWSER_BIN)")
class BrowserTests(PagesTestCase):
    """The pages in headless Chromium against a proxy that has seen a month of use. With
    SCREENSHOTS_DIR set, each page is saved there (the README's screenshots)."""

    NOW = datetime.datetime(2026, 11, 20, 12, 0, tzinfo=datetime.timezone.utc).timestamp()

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def setUp(self):
        super().setUp()
        with open(self.keys_path, "w") as f:
            json.dump({"keys": [
                {"name": "alice", "key": ALICE, "max_tokens": 20000, "tokens_per_day": 4000,
                 "tokens_per_month": 60000},
                {"name": "bob", "key": BOB, "max_tokens": 20000},
                {"name": XSS, "key": CAROL, "max_tokens": 300, "requests_per_day": 40}]}, f)
        self.restart(keys_file=self.keys_path, admin_api_key=ADMIN, token_cost_mode="usage",
                     response_token_reserve=20, refill_tokens=100)
        self.base = self.proxy.url.replace("0.0.0.0", "127.0.0.1")
        self.a_month_of_use()

    def a_month_of_use(self):
        """Thirty days of requests by three keys (bob's to a model named like markup), at
        10:00 each day; today, the last hour before noon minute by minute."""
        count = 0
        for day in range(30):
            if day < 29:
                self.wall.now = self.NOW - (29 - day) * 86400 - 2 * 3600
                self.clock.advance(86400)  # (buckets refill as the days go by)
                plan = [(ALICE, "llama3", 3 + day % 5), (BOB, XSS, day % 4),
                        (CAROL, "qwen2.5-coder", 1 + day % 2)]
            else:  # today: a request or two every other minute
                self.wall.now = self.NOW - 3600
                plan = []
                for minute in range(0, 60, 2):
                    plan += [(ALICE, "llama3", 1), (BOB, XSS, minute % 3),
                             (CAROL, "qwen2.5-coder", 1 if minute % 10 == 0 else 0)]
            for index, (key, model, times) in enumerate(plan):
                for _ in range(times):
                    self.chat(key=key, model=model, messages=[
                        {"role": "user", "content": "word " * (5 + 7 * (count % 5))}])
                    count += 1
                    self.settled(count)  # (logged, hence in the ledger, before the clock moves)
                if day == 29 and index % 3 == 2:
                    self.wall.advance(120)
                    self.clock.advance(120)
        self.wall.now = self.NOW

    def page(self, path, width=1280, height=900, mobile=False):
        page = self.browser.new_page(width, height, mobile)
        self.addCleanup(page.close)
        page.goto(self.base + path)
        return page

    def js(self, page, expression):
        return page.evaluate(expression)

    def shown(self, element_id):
        return f"!document.getElementById({json.dumps(element_id)}).hidden"

    def assert_clean(self, page, allowed=()):
        """Nothing but the proxy was asked for anything, no key went into a URL, and the
        console has no error but those expected (a wrong key's 401)."""
        self.assertTrue(page.requests)
        for url in page.requests:
            self.assertTrue(url.startswith(self.base + "/"), url)
            for secret in (ALICE, BOB, CAROL, ADMIN):
                self.assertNotIn(secret, url)
        errors = [e["text"] for e in page.errors
                  if not any(expected in e["text"] for expected in allowed)]
        self.assertEqual(errors, [])

    def screenshot(self, page, name):
        folder = os.environ.get("SCREENSHOTS_DIR")
        if folder:
            os.makedirs(folder, exist_ok=True)
            page.screenshot(os.path.join(folder, name))

    def test_the_dashboard_after_a_wrong_and_a_right_admin_key(self):
        page = self.page("/admin")
        page.wait_for(self.shown("login"))
        page.type("#admin-key", "sk-not-the-admin")
        page.click("#login-form button[type=submit]")
        page.wait_for("document.getElementById('login-error').textContent !== ''")
        self.assertEqual(page.text("#login-error"), "This route needs the admin key.")
        self.assertEqual(page.session_storage(), {})
        page.type("#admin-key", ADMIN)
        page.click("#login-form button[type=submit]")
        page.wait_for("document.querySelectorAll('#keys tbody tr').length === 3")
        self.assertEqual(page.session_storage(), {"llm_proxy_admin_key": ADMIN})
        self.assertEqual(self.js(page, "location.pathname + location.search"), "/admin")
        report = self.overview(key=ADMIN)
        names = self.js(page, "[...document.querySelectorAll('#keys tbody td.name')]"
                              ".map(td => td.textContent)")
        self.assertEqual(names, ["alice", "bob", XSS])  # the name as characters, not markup
        models = self.js(page, "[...document.querySelectorAll('#models tbody td.name')]"
                               ".map(td => td.textContent)")
        self.assertEqual(models, [m["name"] for m in report["models"]])
        self.assertIn(XSS, models)
        self.assertEqual(self.js(page, "document.querySelectorAll('img').length"), 0)
        rows = self.js(page, "[...document.querySelectorAll('#keys tbody tr')]"
                             ".map(tr => [...tr.cells].map(td => td.textContent))")
        for row, key in zip(rows, report["keys"]):
            self.assertEqual(row[1], f"{key['balance']:,} / {key['limit']:,}")
            self.assertEqual(row[5].split(" / ")[0], f"{key['today']['requests']:,}")
            self.assertEqual(row[6], f"{key['today']['limited']:,}")
        days = self.js(page, "[...document.querySelectorAll('#tokens-chart g.day')]"
                             ".map(g => g.querySelectorAll('rect').length)")
        self.assertEqual(days, [len(report["tokens_per_day"]["keys"])] * 30)
        self.assertEqual(len(report["tokens_per_day"]["keys"]), 3)
        self.assertEqual(self.js(page, "document.querySelectorAll("
                                       "'#minutes-chart rect.minute').length"), 60)
        heights = self.js(page, "[...document.querySelectorAll('#minutes-chart rect.minute')]"
                                ".map(r => Number(r.getAttribute('height')))")
        counted = [m["requests"] for m in report["requests_per_minute"]["minutes"]]
        self.assertEqual([h > 0 for h in heights], [n > 0 for n in counted])
        self.assert_clean(page, allowed=(EXPECTED_401,))
        self.screenshot(page, "admin.png")

    def test_the_dashboard_fits_a_phone(self):
        page = self.page("/admin", 360, 740, mobile=True)
        page.type("#admin-key", ADMIN)
        page.click("#login-form button[type=submit]")
        page.wait_for("document.querySelectorAll('#keys tbody tr').length === 3")
        self.assertLessEqual(self.js(page, "document.documentElement.scrollWidth"), 360)
        self.assert_clean(page, allowed=(EXPECTED_401,))  # (the first look, without a key)
        self.screenshot(page, "admin-phone.png")

    def test_on_this_machine_without_an_admin_key_there_is_no_login(self):
        self.restart(keys_file=self.keys_path)
        self.base = self.proxy.url.replace("0.0.0.0", "127.0.0.1")
        page = self.page("/admin")
        page.wait_for("document.querySelectorAll('#keys tbody tr').length === 3")
        self.assertTrue(self.js(page, "document.getElementById('login').hidden"))
        self.assertTrue(self.js(page, self.shown("local-note")))
        self.assertEqual(page.session_storage(), {})
        self.assert_clean(page)

    def test_the_usage_page_shows_each_key_only_its_own(self):
        seen = {}
        for key, name in ((ALICE, "alice"), (BOB, "bob")):
            page = self.page("/usage", 420, 900, mobile=True)
            page.wait_for(self.shown("login"))
            self.assertEqual(self.js(page, "performance.getEntriesByType('resource')"
                                           ".filter(e => e.name.includes('/v1/usage')).length"), 0)
            page.type("#api-key", "sk-wrong")
            page.click("#login-form button[type=submit]")
            page.wait_for("document.getElementById('login-error').textContent !== ''")
            page.type("#api-key", key)
            page.click("#login-form button[type=submit]")
            page.wait_for("document.getElementById('key-name').textContent !== ''")
            self.assertEqual(page.text("#key-name"), name)
            self.assertEqual(page.session_storage(), {"llm_proxy_usage_key": key})
            seen[name] = {span: self.js(page, f"[...document.querySelectorAll('#{span} .model')]"
                                              ".map(m => m.textContent)")
                          for span in ("today-chart", "month-chart")}
            self.assertEqual(self.js(page, "document.querySelectorAll('img').length"), 0)
            self.assertLessEqual(self.js(page, "document.documentElement.scrollWidth"), 420)
            self.assert_clean(page, allowed=(EXPECTED_401,))
            self.screenshot(page, f"usage-{name}.png")
        for span in ("today-chart", "month-chart"):
            self.assertTrue(any("llama3" in m for m in seen["alice"][span]))
            self.assertFalse(any(XSS in m for m in seen["alice"][span]))
            self.assertTrue(any(XSS in m for m in seen["bob"][span]))  # as text
            self.assertFalse(any("llama3" in m for m in seen["bob"][span]))


@unittest.skipIf(CHROMIUM is None, "no Chromium to run the pages in (apt-get install chromium, "
                                    "or set BROWSER_BIN)")
class CrossSiteTests(ProxyTestCase):
    """What a web page on another site can do with a proxy on this machine, in a real browser:
    nothing. (evil.test is made to resolve to 127.0.0.1, as DNS rebinding would.)"""

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser(CHROMIUM, extra_args=["--host-resolver-rules=MAP evil.test 127.0.0.1"])
        cls.addClassCleanup(cls.browser.close)

    def other_site(self):
        """A page on another port: another origin, as any site the operator opens would be."""
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"<!doctype html><title>another site</title>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self._serve(site)
        return f"http://127.0.0.1:{site.server_address[1]}/"

    def test_another_site_s_page_reads_nothing_and_sends_nothing_upstream(self):
        page = self.browser.new_page()
        self.addCleanup(page.close)
        page.goto(self.other_site())
        proxy = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        tried = page.evaluate("""(async () => {
            const attempt = async (path, options) => {
              try { const r = await fetch('%s' + path, options); return await r.text(); }
              catch (e) { return 'blocked'; } };
            return {admin: await attempt('/admin/keys'),
                    overview: await attempt('/admin/overview'),
                    chat: await attempt('/v1/chat/completions', {method: 'POST',
                      headers: {'Content-Type': 'text/plain'},
                      body: JSON.stringify({model: 'm', messages: [{role: 'user', content: 'hi'}]})})};
          })()""" % proxy)
        self.assertEqual(tried, {"admin": "blocked", "overview": "blocked", "chat": "blocked"})
        self.assertEqual(self.upstream.requests, [])  # the simple POST went nowhere
        self.assertTrue(self.log.wait_for(lambda text: text.count('" 403 ') >= 3))

    def test_a_name_made_to_resolve_here_is_not_this_machine(self):
        page = self.browser.new_page()
        self.addCleanup(page.close)
        page.goto(f"http://evil.test:{self.proxy.server_address[1]}/usage")
        statuses = page.evaluate("Promise.all(['/admin/overview', '/admin/keys', '/metrics']"
                                 ".map(path => fetch(path).then(r => r.status)))")
        self.assertEqual(statuses, [404, 404, 404])
        page.goto(f"http://localhost:{self.proxy.server_address[1]}/usage")
        self.assertEqual(page.evaluate("fetch('/admin/overview').then(r => r.status)"), 200)


if __name__ == "__main__":
    unittest.main()
