"""The users of a trusted front end: a keys-file entry's "users" object gives every user the
front end names (Open WebUI's X-OpenWebUI-User-Email, or the body's "user") a bucket and
quotas of their own, beside the key's; a request must fit both (issue 22)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import unittest
import unittest.mock

import llm_proxy
from llm_proxy import (BucketPolicy, CalendarLimits, Config, ConfigError, MemoryBucketStore,
                       Part, ProxyError)
from tests.support import (NO_REDIS, WAIT, FakeClock, LogCapture, ProxyTestCase, WithRedis,
                           at_once, sse_events)

FRONT = "sk-front-end-SECRET-0123456789"      # Open WebUI's connection key
PLAIN = "sk-plain-key-SECRET-9876543210"      # a key not marked as a front end
ADMIN = "sk-admin-SECRET-abcdef0123"
EMAIL = "X-OpenWebUI-User-Email"


def open_webui_headers(email, name="A Person", role="user", user_id="3f2a"):
    """What Open WebUI 0.12 adds to every request with ENABLE_FORWARD_USER_INFO_HEADERS=true
    (backend/open_webui/utils/headers.py: the name URL-quoted)."""
    return {"X-OpenWebUI-User-Name": name.replace(" ", "%20"), "X-OpenWebUI-User-Id": user_id,
            EMAIL: email, "X-OpenWebUI-User-Role": role}


class UsersPolicyTests(unittest.TestCase):
    """The "users" object of a keys-file entry, and a user's name, checked."""

    def policies(self, users, **entry):
        return llm_proxy.key_policies([{"name": "owui", "key": FRONT, "users": users, **entry}],
                                      Config(), "keys.json")

    def test_a_users_object_gives_each_user_a_policy_of_their_own(self):
        (_, policy), = self.policies({"from": "header:" + EMAIL, "max_tokens": 20000,
                                      "refill_tokens": 2000, "refill_interval_seconds": 300,
                                      "tokens_per_day": 100000, "models": ["smol"],
                                      "required": True, "max_users": 50}, max_tokens=2000000)
        users = policy.users
        self.assertEqual((users.header, users.bucket, users.calendar.tokens_per_day,
                          users.models, users.required, users.max_users),
                         (EMAIL, BucketPolicy(20000, 2000, 300.0), 100000, frozenset({"smol"}),
                          True, 50))
        self.assertEqual(policy.bucket.capacity, 2000000)  # the key's own: the front end's total

    def test_a_users_priority_is_their_class_in_the_queue_else_the_keys(self):
        """A front end's users may wait in a class of their own (Open WebUI's people as
        `high`, its key's own background work as `low`)."""
        (_, policy), = self.policies({"from": "header:" + EMAIL, "priority": "high"},
                                     priority="low")
        ex = llm_proxy.Exchange("POST", "/v1/chat/completions", "127.0.0.1")
        ex.policy = policy
        self.assertEqual(llm_proxy.request_priority(ex), "low")  # no user: the key's own work
        ex.user = "alice@example.com"
        self.assertEqual(llm_proxy.request_priority(ex), "high")
        (_, policy), = self.policies({"from": "header:" + EMAIL}, priority="low")
        ex.policy = policy
        self.assertEqual(llm_proxy.request_priority(ex), "low")  # none of their own: the key's
        with self.assertRaises(llm_proxy.ConfigError) as caught:
            self.policies({"from": "header:" + EMAIL, "priority": "urgent"})
        self.assertIn("users: priority must be high, normal or low", str(caught.exception))

    def test_body_user_reads_the_openai_user_field_and_limits_default_to_the_keys(self):
        (_, policy), = self.policies({"from": "body:user"}, max_tokens=70)
        self.assertEqual((policy.users.header, policy.users.bucket.capacity,
                          policy.users.required, policy.users.max_users),
                         ("", 70, False, llm_proxy.DEFAULT_MAX_USERS))

    def test_a_wrong_users_object_is_refused_naming_the_field(self):
        for users, words in (({}, "from is required"),
                             ({"from": "cookie:x"}, "from must be"),
                             ({"from": "header:Bad Name"}, "from must be"),
                             ({"from": "body:user", "max_tokens": 0}, "max_tokens must be"),
                             ({"from": "body:user", "priority": 1}, "priority must be"),
                             ({"from": "body:user", "weight": 1}, "unknown field 'weight'"),
                             ({"from": "body:user", "required": "yes"}, "required must be"),
                             ({"from": "body:user", "max_users": 0}, "max_users must be")):
            with self.subTest(users=users), self.assertRaises(ConfigError) as caught:
                self.policies(users)
            self.assertIn("keys.json: keys[0] (owui): users: ", str(caught.exception))
            self.assertIn(words, str(caught.exception))
        with self.assertRaises(ConfigError):
            self.policies(["header:" + EMAIL])

    def test_a_user_name_is_bounded_and_holds_no_control_or_invisible_characters(self):
        for raw, expected in (("alice@example.com", "alice@example.com"), ("  bob ", "bob"),
                              ("Zoë 李", "Zoë 李"), (None, ""), ("", ""),
                              ("<script>x</script>", "<script>x</script>"),  # text, shown as text
                              ("x" * llm_proxy.MAX_USER_NAME, "x" * llm_proxy.MAX_USER_NAME)):
            with self.subTest(raw=raw):
                self.assertEqual(llm_proxy.user_name(raw, "h"), expected)
        for raw in ("a\nb", "a\x00", "a\x1b[31m", "a\x7f", "a\x85", "evil\u202egnp.exe",
                    "a\u200bb", "a\ud800", "x" * (llm_proxy.MAX_USER_NAME + 1), 7, ["a"]):
            with self.subTest(raw=raw), self.assertRaises(ProxyError) as caught:
                llm_proxy.user_name(raw, "h")
            self.assertEqual((caught.exception.status, caught.exception.code),
                             (400, "invalid_user"))

    def test_a_users_bucket_key_reads_back_whatever_the_name_holds(self):
        key = "key:" + llm_proxy.key_digest(FRONT)
        for name in ("alice", "a/user:b", ""):
            with self.subTest(name=name):
                joined = llm_proxy.user_bucket_key(key, name) if name else key
                self.assertEqual(llm_proxy.split_user(joined), (key, name))
        self.assertEqual(llm_proxy.split_user("ip:10.0.0.1/user:x"), ("ip:10.0.0.1/user:x", ""))


class TogetherContract:
    """take_together: a user's part and their key's are spent together or not at all."""

    KEY = "key:" + "f" * 64

    def user(self, name):
        return llm_proxy.user_bucket_key(self.KEY, name)

    def parts(self, name, user_cap=30, key_cap=60, max_users=100, user_limits=None,
              key_limits=None):
        return (Part(self.user(name), BucketPolicy(user_cap, 1, 300.0), user_limits, max_users),
                Part(self.KEY, BucketPolicy(key_cap, 1, 300.0), key_limits))

    def test_both_limits_admit_atomically_under_concurrency(self):
        """Three users of 30 tokens behind a key of 60, twenty requests of 5 each at once: each
        user gets at most 6, and all of them together exactly the key's 12."""
        admitted: dict[str, int] = {"a": 0, "b": 0, "c": 0}
        lock = threading.Lock()

        def one(index):
            name = "abc"[index % 3]
            quotas = self.store.take_together(self.parts(name), 5)
            if all(q.admitted for q in quotas):
                with lock:
                    admitted[name] += 1
            else:
                self.assertFalse(any(q.admitted for q in quotas))
        at_once(60, one)
        self.assertEqual(self.store.status().get("reachable", True), True)
        self.assertEqual(sum(admitted.values()), 12)
        self.assertTrue(all(n <= 6 for n in admitted.values()), admitted)
        key_left = self.store.peek(self.KEY, BucketPolicy(60, 1, 300.0)).remaining
        users_left = [self.store.peek(self.user(n), BucketPolicy(30, 1, 300.0)).remaining
                      for n in "abc"]
        self.assertEqual(key_left, 0)
        self.assertEqual([30 - left for left in users_left], [5 * admitted[n] for n in "abc"])

    def test_a_refusal_by_either_takes_nothing_from_the_other(self):
        quotas = self.store.take_together(self.parts("a", user_cap=4), 5)
        self.assertEqual([(q.admitted, q.limited_by) for q in quotas],
                         [(False, "bucket"), (False, "")])
        self.assertEqual(self.store.peek(self.KEY, BucketPolicy(60, 1, 300.0)).remaining, 60)
        quotas = self.store.take_together(self.parts("a", key_cap=4), 5)
        self.assertEqual([(q.admitted, q.limited_by) for q in quotas],
                         [(False, ""), (False, "bucket")])
        self.assertEqual(self.store.peek(self.user("a"), BucketPolicy(30, 1, 300.0)).remaining,
                         30)

    def test_a_users_calendar_quota_refuses_for_that_user_only(self):
        periods = llm_proxy.Periods("2026-12-07", "2026-12", 3600.0, 86400.0)
        limits = CalendarLimits(requests_per_day=2)
        for _ in range(2):
            self.assertTrue(all(q.admitted for q in self.store.take_together(
                self.parts("a", user_limits=limits), 1, periods)))
        quotas = self.store.take_together(self.parts("a", user_limits=limits), 1, periods)
        self.assertEqual((quotas[0].admitted, quotas[0].limited_by, quotas[0].wait_seconds),
                         (False, "requests_per_day", 3600.0))
        self.assertTrue(all(q.admitted for q in self.store.take_together(
            self.parts("b", user_limits=limits), 1, periods)))

    def test_the_users_of_a_key_are_bounded_the_least_recently_active_forgotten(self):
        for name in ("a", "b", "c", "b", "d"):
            self.store.take_together(self.parts(name, max_users=3), 5)
        self.assertEqual(sorted(llm_proxy.split_user(k)[1] for k in
                                self.store.users_of(self.KEY)), ["b", "c", "d"])
        self.assertEqual(self.store.peek(self.user("a"), BucketPolicy(30, 1, 300.0)).remaining,
                         30)  # forgotten: a new user again
        self.assertEqual(self.store.peek(self.user("b"), BucketPolicy(30, 1, 300.0)).remaining,
                         20)


class MemoryTogetherTests(TogetherContract, unittest.TestCase):
    def setUp(self):
        self.store = MemoryBucketStore(FakeClock())


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisTogetherTests(WithRedis, TogetherContract, unittest.TestCase):
    def setUp(self):
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        self.client.flushall()
        # (a slow moment must not look like an outage: that would serve from this process's
        # own buckets, which is the failure mode's business, not this contract's)
        self.store = llm_proxy.RedisBucketStore(
            Config(redis_url=self.redis.url, redis_timeout=WAIT), LogCapture().write,
            llm_proxy.Metrics())

    def test_a_users_redis_keys_share_their_keys_hash_tag_and_hold_no_name(self):
        self.store.take_together(self.parts("alice@example.com"), 5)
        names = sorted(n.decode() for n in self.client.scan_iter("*"))
        tag = "{" + llm_proxy.key_digest(self.KEY) + "}"
        self.assertTrue(names and all(tag in n for n in names), names)
        self.assertNotIn(b"alice", b" ".join(n.encode() for n in names))

    def test_a_failure_after_the_take_never_takes_the_request_twice(self):
        """Redis fails after the script took the request (while the users' activity is
        noted): the take stands in Redis, and the local store takes nothing."""
        import redis
        with unittest.mock.patch.object(self.store, "_seen_user",
                                        side_effect=redis.ConnectionError("gone")):
            quotas = self.store.take_together(self.parts("ann"), 5)
        self.assertTrue(all(q.admitted for q in quotas))
        self.assertEqual(self.store.peek(self.user("ann"), BucketPolicy(30, 1, 300.0)).remaining,
                         25)
        self.assertEqual(self.store.local.peek(self.user("ann"),
                                               BucketPolicy(30, 1, 300.0)).remaining, 30)


class FrontEndTestCase(ProxyTestCase):
    """A proxy with a keys file holding a front end's key (users from Open WebUI's header)
    and a plain key; a fake front end sends the Open WebUI headers."""

    USERS = {"from": "header:" + EMAIL, "max_tokens": 2, "refill_tokens": 1,
             "refill_interval_seconds": 300}

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.keys_path = os.path.join(self.tmp, "keys.json")
        self.write_keys(self.USERS)
        super().setUp()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write_keys(self, users, **front):
        entries = [{"name": "open-webui", "key": FRONT, "max_tokens": 5, "users": users,
                    **front},
                   {"name": "plain", "key": PLAIN, "max_tokens": 5}]
        with open(self.keys_path, "w") as f:
            json.dump({"keys": entries}, f)

    def start_proxy(self, **settings):
        settings.setdefault("keys_file", self.keys_path)
        settings.setdefault("admin_api_key", ADMIN)
        return super().start_proxy(**settings)

    def ask(self, email=None, key=FRONT, **fields):
        headers = open_webui_headers(email) if email else {}
        return self.chat(key=key, headers=headers, **fields)

    def usage(self, email=None, key=FRONT):
        status, _, body = self.request("GET", "/v1/usage", key=key,
                                       headers={EMAIL: email} if email else None)
        self.assertEqual(status, 200, body)
        return json.loads(body)


class FrontEndTests(FrontEndTestCase):
    def test_each_user_reaches_their_own_limit_while_the_other_chats_on(self):
        for _ in range(2):
            status, headers, body = self.ask("alice@example.com")
            self.assertEqual(status, 200)
        self.assertEqual((headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]),
                         ("2", "0"))  # the user's figures, not the key's (5)
        status, headers, body = self.ask("alice@example.com")
        answer = json.loads(body)
        self.assertEqual(status, 200)  # the limit said as an answer, as Open WebUI shows it
        self.assertEqual(answer["choices"][0]["message"]["content"], "limit reached, wait 5 min")
        self.assertEqual((headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]),
                         ("2", "0"))
        status, headers, body = self.ask("bob@example.com")
        self.assertEqual((status, headers["x-ratelimit-remaining"]), (200, "1"))
        self.assertNotIn("limit reached", body.decode())
        self.assertEqual(len(self.upstream.requests), 3)  # the refused one never went up
        self.assertTrue(self.log.wait_for(lambda text: (
            ' key=open-webui user="alice@example.com" "POST /v1/chat/completions" 200' in text)))
        self.ask('Zo\u00eb "x" y')  # (a name as text: quoted, escaped, nothing it could forge)
        self.assertTrue(self.log.wait_for(  # (the line is written once the answer is out)
            lambda text: ' user="Zo\\u00eb \\"x\\" y" "POST' in text), self.log.getvalue())
        self.assertEqual(self.usage()["bucket"]["balance"], 1)  # the key paid for all four

    def test_the_keys_own_limit_is_the_front_ends_total(self):
        for index in range(5):
            self.assertEqual(self.ask(f"user{index}@example.com")[0], 200)
        status, headers, body = self.ask("user9@example.com")
        self.assertIn("limit reached", body.decode())
        self.assertEqual(headers["x-ratelimit-limit"], "5")  # the key refused: its figures
        self.assertEqual(self.usage("user9@example.com")["bucket"]["balance"], 2)

    def test_a_request_without_a_user_is_the_keys_own_work(self):
        self.assertEqual(self.ask()[0], 200)   # a title or tags request, no user
        self.assertEqual(self.usage()["bucket"]["balance"], 4)
        self.assertEqual(self.proxy.store.users_of("key:" + llm_proxy.key_digest(FRONT)), [])

    def test_when_users_are_required_a_request_without_one_is_refused_in_its_apis_shape(self):
        self.write_keys({**self.USERS, "required": True})
        self.restart()
        status, _, body = self.ask()
        error = self.assert_openai_error(status, body, 400, "user_required")
        self.assertIn(EMAIL, error["message"])
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "fake-a", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            key=FRONT)
        self.assertEqual((status, json.loads(body)["type"],
                          json.loads(body)["error"]["type"]), (400, "error",
                                                               "invalid_request_error"))
        status, _, body = self.request("POST", "/api/chat", {
            "model": "fake-a", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
            key=FRONT)
        self.assertEqual(status, 400)
        self.assertIn(EMAIL, json.loads(body)["error"])
        self.assertEqual(self.upstream.requests, [])

    def test_the_header_means_nothing_on_a_key_not_marked_as_a_front_end(self):
        for _ in range(3):
            self.assertEqual(self.ask("alice@example.com", key=PLAIN)[0], 200)
        self.assertEqual(self.usage(key=PLAIN)["bucket"]["balance"], 2)
        self.assertNotIn("user", self.usage("alice@example.com", key=PLAIN))
        self.assertFalse(any(llm_proxy.USER_MARK in k for k in self.proxy.store._buckets))

    def test_an_unusable_user_name_is_refused_and_never_reaches_the_upstream(self):
        status, _, body = self.chat(key=FRONT, headers={EMAIL: "a\u202eb".encode().decode(
            "latin-1")})
        self.assert_openai_error(status, body, 400, "invalid_user")
        status, _, body = self.chat(key=FRONT, headers={EMAIL: "x" * 300})
        self.assert_openai_error(status, body, 400, "invalid_user")
        self.assertEqual(self.upstream.requests, [])

    def test_the_body_user_field_names_the_user_when_the_key_says_so(self):
        self.write_keys({**self.USERS, "from": "body:user"})
        self.restart()
        for _ in range(2):
            self.assertEqual(self.chat(key=FRONT, user="carol")[0], 200)
        status, _, body = self.chat(key=FRONT, user="carol")
        self.assertIn("limit reached", body.decode())
        self.assertEqual(self.chat(key=FRONT, user="dave")[0], 200)
        status, _, body = self.request("GET", "/v1/usage?user=carol", key=FRONT)
        self.assertEqual((json.loads(body)["user"], json.loads(body)["bucket"]["balance"]),
                         ("carol", 0))

    def test_the_limit_answer_is_the_users_in_every_api(self):
        self.write_keys({**self.USERS, "max_tokens": 1})
        self.restart()
        headers = open_webui_headers("erin@example.com")
        chat = {"model": "fake-a", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat, key=FRONT,
                                      headers=headers)[0], 200)
        status, _, body = self.request("POST", "/v1/chat/completions", {**chat, "stream": True},
                                       key=FRONT, headers=headers)
        texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(body)
                 if e != b"[DONE]" and json.loads(e)["choices"]]
        self.assertIn("limit reached, wait 5 min", texts)
        status, _, body = self.request("POST", "/v1/messages", {**chat, "max_tokens": 5},
                                       key=FRONT, headers=headers)
        self.assertEqual(json.loads(body)["content"][0]["text"], "limit reached, wait 5 min")
        status, _, body = self.request("POST", "/api/chat", {**chat, "stream": False},
                                       key=FRONT, headers=headers)
        self.assertEqual(json.loads(body)["message"]["content"], "limit reached, wait 5 min")

    def test_in_429_mode_the_limit_is_a_429_with_the_users_figures(self):
        self.write_keys(self.USERS, limit_response="429")
        self.restart()
        for _ in range(2):
            self.ask("frank@example.com")
        status, headers, body = self.ask("frank@example.com")
        error = self.assert_openai_error(status, body, 429, "rate_limit_exceeded")
        self.assertIn("Rate limit reached for you", error["message"])
        self.assertEqual((headers["x-ratelimit-limit"], headers["retry-after"]), ("2", "300"))
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "fake-a", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            key=FRONT, headers=open_webui_headers("frank@example.com"))
        self.assertEqual((status, json.loads(body)["error"]["type"]), (429, "rate_limit_error"))

    def test_v1_usage_called_by_the_front_end_with_a_user_header_answers_for_that_user(self):
        self.ask("gina@example.com")
        self.ask("hal@example.com")
        self.ask()
        gina = self.usage("gina@example.com")
        self.assertEqual((gina["key"], gina["user"], gina["bucket"]["limit"],
                          gina["bucket"]["balance"]), ("open-webui", "gina@example.com", 2, 1))
        self.assertEqual(gina["usage"]["today"]["total"]["requests"], 1)
        key = self.usage()
        self.assertEqual((key["bucket"]["limit"], key["bucket"]["balance"]), (5, 2))
        self.assertEqual(key["usage"]["today"]["total"]["requests"], 3)  # its users' and its own

    def test_a_user_limited_to_some_models_gets_403_for_others(self):
        self.write_keys({**self.USERS, "models": ["fake-b"]})
        self.restart()
        status, _, body = self.ask("ivy@example.com")
        self.assert_openai_error(status, body, 403, "model_not_allowed")
        self.assertEqual(self.ask("ivy@example.com", model="fake-b")[0], 200)
        self.assertEqual(self.ask(model="fake-a")[0], 200)  # the key's own work is not a user's

    def test_the_ledger_and_the_reports_show_users_under_their_key(self):
        for email in ("jo@example.com", "jo@example.com", "jo@example.com", "kim@example.com"):
            self.ask(email)
        self.ask()
        self.ask(key=PLAIN)
        status, _, body = self.request("GET", "/admin/usage?by=user", key=ADMIN)
        rows = {(r["key"], r["user"]): (r["requests"], r["limited_requests"])
                for r in json.loads(body)["rows"]}
        self.assertEqual(rows, {("open-webui", ""): (1, 0), ("open-webui", "jo@example.com"): (3, 1),
                                ("open-webui", "kim@example.com"): (1, 0), ("plain", ""): (1, 0)})
        status, _, body = self.request("GET", "/admin/usage?by=key", key=ADMIN)
        self.assertEqual({r["key"]: r["requests"] for r in json.loads(body)["rows"]},
                         {"open-webui": 5, "plain": 1})
        report = llm_proxy.usage_report(self.proxy.usage_rows(0, 1e12), "user",
                                        self.proxy.calendar)
        table = llm_proxy.format_report(report, "user", "table").splitlines()
        self.assertEqual(table[0].split()[:3], ["key", "user", "requests"])
        self.assertTrue(any(line.split()[:2] == ["open-webui", "jo@example.com"]
                            for line in table))
        status, _, body = self.request("GET", "/admin/overview", key=ADMIN)
        card = next(k for k in json.loads(body)["keys"] if k["name"] == "open-webui")
        users = {u["user"]: (u["balance"], u["today"]["requests"], u["today"]["limited"])
                 for u in card["users"]}
        self.assertEqual(users, {"jo@example.com": (0, 3, 1), "kim@example.com": (1, 1, 0)})
        self.assertEqual(card["today"]["requests"], 5)  # the key's line counts its users too
        self.assertNotIn("users", next(k for k in json.loads(body)["keys"]
                                       if k["name"] == "plain"))


class UsersRestartTests(FrontEndTestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, "state.db")
        self.restart(state_db=self.path)

    def test_a_users_bucket_and_ledger_survive_a_restart(self):
        self.ask("lee@example.com")
        self.ask("lee@example.com")
        self.proxy.shutdown()
        self.proxy.server_close()
        self.restart(state_db=self.path)
        self.assertEqual(self.usage("lee@example.com")["bucket"]["balance"], 0)
        self.assertIn("limit reached", self.ask("lee@example.com")[2].decode())
        self.assertEqual(self.ask("max@example.com")[0], 200)
        with sqlite3.connect(self.path) as db:
            names = [row[0] for row in db.execute("SELECT key FROM buckets")]
        self.assertIn(llm_proxy.user_bucket_key("key:" + llm_proxy.key_digest(FRONT),
                                                "lee@example.com"), names)
        self.assertEqual(self.proxy.store.users_of("key:" + llm_proxy.key_digest(FRONT))[0],
                         llm_proxy.user_bucket_key("key:" + llm_proxy.key_digest(FRONT),
                                                   "lee@example.com"))


class UsageModeUserTests(FrontEndTestCase):
    USERS = {"from": "header:" + EMAIL, "max_tokens": 300, "refill_tokens": 30,
             "refill_interval_seconds": 300}

    def start_proxy(self, **settings):
        settings.setdefault("token_cost_mode", "usage")
        return super().start_proxy(**settings)

    def write_keys(self, users, **front):
        super().write_keys(users, max_tokens=100000, **front)

    def test_the_settlement_moves_the_user_and_the_key_alike(self):
        status, _, body = self.ask("nia@example.com", max_tokens=5)
        reported = json.loads(body)["usage"]["total_tokens"]
        self.assertEqual(self.usage("nia@example.com")["bucket"]["balance"], 300 - reported)
        self.assertEqual(self.usage()["bucket"]["balance"], 100000 - reported)

    def test_a_request_made_large_by_its_tools_says_so(self):
        tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "x" * 600,
                                                    "parameters": {"type": "object"}}}
                 for i in range(36)]  # what Open WebUI sends with every chat
        status, _, body = self.ask("oz@example.com", tools=tools, max_tokens=5)
        self.assertEqual(status, 200)  # said as the limit, in message mode
        text = json.loads(body)["choices"][0]["message"]["content"]
        self.assertIn("definitions of the 36 tools", text)
        self.assertIn("a user's bucket holds at most 300", text)
        self.assertNotIn("start a new conversation", text)


class StoppedStreamTests(unittest.TestCase):
    """A stream its client stops (Open WebUI's Stop button) is charged what the server counted
    so far: llama.cpp's per-chunk timings, vLLM's continuous usage."""

    def chunk(self, text, **extra):
        return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk",
                                       "choices": [{"index": 0, "delta": {"content": text},
                                                    "finish_reason": None}], **extra},
                                      separators=(",", ":")).encode() + b"\n\n"

    def meter(self):
        meter = llm_proxy.UsageMeter(True, strip=True)
        meter.counts_asked = True
        meter.begin(200, None, True)
        return meter

    def test_llama_cpp_timings_on_every_chunk_are_read_and_not_relayed(self):
        meter = self.meter()
        relayed = b"".join(meter.feed(self.chunk("Hi", timings={
            "cache_n": 10, "prompt_n": 50, "predicted_n": n})) for n in range(1, 4))
        self.assertEqual(relayed, self.chunk("Hi") * 3)  # as the client would have had it
        self.assertEqual(meter.cost(4015), (60, 3, 63))   # not the prompt's estimate

    def test_a_stop_before_the_first_token_is_charged_the_prompt_the_server_counts(self):
        """llama.cpp's return_progress: a first chunk, before the prompt is evaluated, says
        how long it is (a chunk the client did not ask for: not relayed)."""
        meter = self.meter()
        progress = {"total": 46, "cache": 27, "processed": 27, "time_ms": 0}
        relayed = meter.feed(self.chunk(None, prompt_progress=progress, timings={
            "cache_n": 27, "prompt_n": 0, "predicted_n": 0}))
        self.assertEqual(relayed, b"")
        self.assertEqual(meter.cost(3273), (46, 0, 46))  # not the tools' estimate

    def test_vllm_continuous_usage_is_read_and_not_relayed(self):
        meter = self.meter()
        relayed = meter.feed(self.chunk("Hi", usage={"prompt_tokens": 60, "completion_tokens": 7,
                                                     "total_tokens": 67}))
        self.assertEqual(relayed, self.chunk("Hi"))
        self.assertEqual(meter.cost(4015), (60, 7, 67))

    def test_an_anthropic_stream_stopped_is_charged_the_input_tokens_it_began_with(self):
        meter = llm_proxy.AnthropicMeter(True)
        meter.begin(200, None, True)
        start = {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "usage": {"input_tokens": 2, "cache_read_input_tokens": 58, "output_tokens": 0}}}
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "Hi there"}}
        for name, data in (("message_start", start), ("content_block_delta", delta)):
            meter.feed(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.assertEqual(meter.cost(4015), (60, 8, 68))  # the client left here (8: the
        # upper bound of "Hi there", its UTF-8 bytes; not the 4,015 the prompt's estimate is)

    def test_the_counts_are_asked_for_only_where_the_proxy_asks_for_usage(self):
        shape = llm_proxy.OPENAI
        payload = {"model": "m", "stream": True}
        routes = llm_proxy.RouteTable(llm_proxy.DEFAULT_ROUTES)
        self.assertTrue(shape.ask_for_counts(payload, routes.find("POST", "/v1/chat/completions")))
        self.assertEqual((payload["timings_per_token"], payload["return_progress"],
                          payload["stream_options"]), (True, True, {"continuous_usage_stats": True}))
        self.assertFalse(shape.ask_for_counts({"model": "m"}, routes.find("POST", "/v1/responses")))


if __name__ == "__main__":
    unittest.main()


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisFrontEndTests(WithRedis, FrontEndTestCase):
    """The same front end with its buckets in Redis: users limited on their own, settled to
    both, listed under their key."""

    def start_proxy(self, **settings):
        settings.setdefault("redis_url", self.redis.url)
        settings.setdefault("redis_timeout", WAIT)
        return super().start_proxy(**settings)

    def setUp(self):
        client = self.redis.client()
        client.flushall()
        client.close()
        super().setUp()

    def test_users_in_redis_reach_their_own_limits_and_show_under_their_key(self):
        for email in ("pat@example.com", "pat@example.com", "pat@example.com", "quinn@example.com"):
            self.ask(email)
        self.assertEqual((self.usage("pat@example.com")["bucket"]["balance"],
                          self.usage("quinn@example.com")["bucket"]["balance"],
                          self.usage()["bucket"]["balance"]), (0, 1, 2))
        status, _, body = self.request("GET", "/admin/overview", key=ADMIN)
        card = next(k for k in json.loads(body)["keys"] if k["name"] == "open-webui")
        self.assertEqual(sorted((u["user"], u["balance"]) for u in card["users"]),
                         [("pat@example.com", 0), ("quinn@example.com", 1)])
