"""Several model servers behind one proxy (UPSTREAMS_FILE): routing by model, aliases, the
merged model lists, health and failover, hot reload, the clients through routing."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import unittest

import llm_proxy
from llm_proxy import Config, ProxyServer
from tests.support import (
    CLIENT_KEY, SCENARIOS, WAIT, FakeUpstream, FakeUpstreamHandler, NO_REDIS, ProxyTestCase,
    FakeClock, WithRedis, free_port, parse_metrics, wait_until)

try:
    import openai
except ImportError:
    openai = None
try:
    import anthropic
except ImportError:
    anthropic = None
try:
    import ollama
except ImportError:
    ollama = None


class ModelServerHandler(FakeUpstreamHandler):
    """The fake upstream, serving its own models, with a fault of its own (`server.fault`: a
    status to answer everything with, or a SCENARIOS name) whatever the client asks."""

    def _serve(self):
        fault = self.server.fault
        if isinstance(fault, int):
            length = int(self.headers.get("Content-Length") or 0)
            self.server.record(self.command, self.path, dict(self.headers.items()),
                               self.rfile.read(length) if length else b"")
            return self.error(fault)
        if fault:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            self.body = body
            self.server.record(self.command, self.path, dict(self.headers.items()), body)
            return SCENARIOS[fault](self, self.path.partition("?")[0], json.loads(body or b"{}"))
        super()._serve()

    def openai(self, path, request, habit=""):
        if path == "/v1/models":
            return self.json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1, "owned_by": "fake"}
                for m in self.server.models]})
        return super().openai(path, request, habit)


class ModelServer(FakeUpstream):
    def __init__(self, models=("fake-a",)):
        super().__init__()
        self.RequestHandlerClass = ModelServerHandler
        self.models = list(models)
        self.fault = None

    def bodies(self):
        with self.lock:
            return [json.loads(body) for method, _, _, body in self.requests
                    if method == "POST" and body]


def entry(name, server, models=None, **fields):
    url = server.url if isinstance(server, FakeUpstream) else server
    return {"name": name, "url": url, **({"models": models} if models else {}), **fields}


class UpstreamsCase(ProxyTestCase):
    """Three fake servers: box1 (alpha, shared), box2 (beta, shared), box3 (its model list
    says gamma); the alias gpt-4o-mini is alpha."""

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(self.folder, f))
                                 for f in os.listdir(self.folder)])
        self.path = os.path.join(self.folder, "upstreams.json")
        self.box1, self.box2, self.box3 = (self.serve_box(m) for m in (
            ("alpha",), ("beta",), ("gamma",)))
        self.write({"upstreams": [entry("box1", self.box1, ["alpha", "shared"]),
                                  entry("box2", self.box2, ["beta", "shared"]),
                                  entry("box3", self.box3)],
                    "aliases": {"gpt-4o-mini": "alpha"}})
        super().setUp()

    def serve_box(self, models):
        box = ModelServer(models)
        self._serve(box)
        self.addCleanup(box.stop.set)
        return box

    def write(self, document, path=None):
        with open(path or self.path, "w") as f:
            json.dump(document, f)

    def start_proxy(self, **settings):
        settings.setdefault("base_api_url", self.upstream.url)
        settings.setdefault("upstreams_file", self.path)
        config = Config(host="127.0.0.1", port=0, state_db="off", **settings)
        proxy = ProxyServer(config, clock=self.clock, log_stream=self.log,
                            key_check_interval=3600, keys_settle_seconds=1,
                            health_check_interval=3600)
        self._serve(proxy)
        return proxy

    @property
    def router(self):
        return self.proxy.forwarder.router

    def server(self, name):
        return next(s for s in self.router.servers if s.name == name)

    def ask(self, model, **fields):
        return self.chat(model=model, **fields)


class RoutingTests(UpstreamsCase):
    def test_each_model_goes_to_a_server_that_serves_it_and_the_log_names_it(self):
        for model, box in (("alpha", self.box1), ("beta", self.box2), ("gamma", self.box3)):
            with self.subTest(model=model):
                status, _, body = self.ask(model)
                self.assertEqual(status, 200, body)
                self.assertEqual(box.bodies()[-1]["model"], model)
        self.assertEqual([len(b.bodies()) for b in (self.box1, self.box2, self.box3)], [1, 1, 1])
        self.assertEqual(self.upstream.requests, [])  # BASE_API_URL is not one of them
        self.assertTrue(self.log.wait_for(lambda text: text.count(" upstream=") == 3))
        self.assertIn(" upstream=box3", self.log.getvalue())

    def test_a_model_on_two_servers_alternates_when_they_are_equally_busy(self):
        for _ in range(4):
            self.assertEqual(self.ask("shared")[0], 200)
        self.assertEqual((len(self.box1.bodies()), len(self.box2.bodies())), (2, 2))

    def test_the_server_with_fewer_requests_in_flight_is_chosen(self):
        self.server("box1").in_flight = 3
        chosen = [self.router.pick("shared") for _ in range(3)]
        self.assertEqual([s.name for s in chosen], ["box2"] * 3)
        chosen.append(self.router.pick("shared"))  # now 3 and 3: in turn
        self.assertIn(chosen[-1].name, ("box1", "box2"))
        for server in chosen:
            self.router.release(server)
        self.assertEqual(self.server("box2").in_flight, 0)

    def test_an_alias_is_forwarded_as_its_target_and_recorded_as_it(self):
        status, _, body = self.ask("gpt-4o-mini")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.box1.bodies()[-1]["model"], "alpha")
        self.assertTrue(self.log.wait_for(lambda text: " cost=" in text))
        models = {row[0].model for row in self.proxy.ledger.rows(0, 2 ** 40)}
        self.assertEqual(models, {"alpha"})

    def test_every_charged_route_of_the_three_apis_is_routed(self):
        cases = [
            ("/v1/completions", {"model": "beta", "prompt": "hi"}),
            ("/v1/responses", {"model": "beta", "input": "hi"}),
            ("/v1/embeddings", {"model": "beta", "input": "hi"}),
            ("/v1/messages", {"model": "beta", "max_tokens": 5,
                              "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/messages/count_tokens", {"model": "beta",
                                           "messages": [{"role": "user", "content": "hi"}]}),
            ("/api/chat", {"model": "beta", "stream": False,
                           "messages": [{"role": "user", "content": "hi"}]}),
            ("/api/generate", {"model": "beta", "prompt": "hi", "stream": False}),
            ("/api/embed", {"model": "beta", "input": "hi"}),
            ("/api/show", {"model": "beta"}),
        ]
        for path, body in cases:
            with self.subTest(path=path):
                status, _, answer = self.request("POST", path, body)
                self.assertEqual(status, 200, answer)
                self.assertEqual(self.box2.paths()[-1], path)
        self.assertEqual(self.box1.bodies() + self.box3.bodies(), [])

    def test_an_unknown_model_is_a_404_in_the_routes_shape_and_costs_nothing(self):
        before = self.remaining()
        status, _, body = self.ask("nope")
        error = self.assert_openai_error(status, body, 404, "model_not_found")
        for name in ("alpha", "beta", "gamma", "gpt-4o-mini", "shared"):
            self.assertIn(name, error["message"])
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual((status, json.loads(body)["type"]), (404, "error"))
        self.assertEqual(json.loads(body)["error"]["type"], "not_found_error")
        status, _, body = self.request("POST", "/api/chat", {"model": "nope", "messages": []})
        self.assertEqual(status, 404)
        self.assertIn("nope", json.loads(body)["error"])
        self.assertEqual(self.remaining(), before)
        self.assertEqual(self.box1.bodies() + self.box2.bodies() + self.box3.bodies(), [])

    def test_a_request_without_a_model_is_a_400_when_there_are_several_servers(self):
        status, _, body = self.request("POST", "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": "hi"}]})
        self.assert_openai_error(status, body, 400, "model_required")

    def test_with_one_server_a_request_without_a_model_goes_to_it(self):
        self.write({"upstreams": [entry("only", self.box1, ["alpha"])]})
        self.restart()
        status, _, body = self.request("POST", "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.box1.bodies()), 1)

    def test_each_server_has_its_own_api_key_from_the_file_or_the_environment(self):
        os.environ["H7_TEST_BOX2_KEY"] = "sk-box2-secret"
        self.addCleanup(os.environ.pop, "H7_TEST_BOX2_KEY")
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"], api_key="sk-box1"),
                                  entry("box2", self.box2, ["beta"],
                                        api_key_env="H7_TEST_BOX2_KEY")]})
        self.restart()
        self.ask("alpha")
        self.ask("beta")
        self.assertEqual(self.box1.requests[-1][2]["Authorization"], "Bearer sk-box1")
        self.assertEqual(self.box2.requests[-1][2]["Authorization"], "Bearer sk-box2-secret")

    def test_a_model_list_the_file_does_not_give_is_read_again_every_refresh(self):
        self.assertEqual(self.ask("delta")[0], 404)
        self.box3.models = ["gamma", "delta"]
        self.clock.advance(59)
        self.router.tick()
        self.assertEqual(self.ask("delta")[0], 404)  # (MODELS_REFRESH_SECONDS is 60)
        self.clock.advance(1)
        self.router.tick()
        self.assertEqual(self.ask("delta")[0], 200)
        self.assertEqual(self.box3.bodies()[-1]["model"], "delta")

    def test_each_server_has_its_own_queue(self):
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"], max_concurrency=1),
                                  entry("box2", self.box2, ["beta"], max_concurrency=1)]})
        self.restart(read_timeout=1)
        self.box1.fault = "hang"
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(self.ask("alpha")[0]))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        self.assertTrue(wait_until(lambda: self.server("box1").gate.waiting() == 1))
        self.assertEqual(self.ask("beta")[0], 200)  # box1's queue holds up no one else
        for thread in threads:
            thread.join(WAIT)
        self.assertEqual(sorted(statuses), [504, 504])
        self.box1.stop.set()

    @unittest.skipIf(sys.version_info < (3, 11), "TOML files need tomllib (Python 3.11)")
    def test_a_toml_file_is_read_too(self):
        path = os.path.join(self.folder, "upstreams.toml")
        with open(path, "w") as f:
            f.write(f'[[upstreams]]\nname = "box2"\nurl = "{self.box2.url}"\n'
                    f'models = ["beta"]\n\n[aliases]\nb = "beta"\n')
        self.restart(upstreams_file=path)
        self.assertEqual(self.ask("b")[0], 200)
        self.assertEqual(self.box2.bodies()[-1]["model"], "beta")


class ModelListTests(UpstreamsCase):
    MERGED = ["alpha", "beta", "gamma", "gpt-4o-mini", "shared"]

    def test_the_openai_list_is_the_union_of_the_servers_and_the_aliases(self):
        status, _, body = self.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        data = json.loads(body)["data"]
        self.assertEqual([m["id"] for m in data], self.MERGED)
        self.assertEqual({m["id"]: m["owned_by"] for m in data}["shared"], "box1,box2")
        self.assertEqual(json.loads(self.request("GET", "/v1/models/gpt-4o-mini")[2])["id"],
                         "gpt-4o-mini")
        self.assert_openai_error(*self.request("GET", "/v1/models/nope")[::2], 404,
                                 "model_not_found")
        self.assertEqual(self.box1.requests + self.box2.requests, [])

    def test_the_ollama_lists_in_their_shape(self):
        for path in ("/api/tags", "/api/ps"):
            with self.subTest(path=path):
                status, _, body = self.request("GET", path)
                self.assertEqual(status, 200)
                names = [m["name"] for m in json.loads(body)["models"]]
                self.assertEqual(names, [m + ":latest" for m in self.MERGED])

    def test_a_server_that_is_down_leaves_the_list(self):
        self.server("box3").failed()
        ids = [m["id"] for m in json.loads(self.request("GET", "/v1/models")[2])["data"]]
        self.assertNotIn("gamma", ids)

    def test_a_keys_models_list_filters_both_lists_naming_an_alias_or_a_target(self):
        keys = os.path.join(self.folder, "keys.json")
        with open(keys, "w") as f:
            json.dump({"keys": [{"name": "a", "key": "sk-a", "models": ["gpt-4o-mini", "beta"]},
                                {"name": "t", "key": "sk-t", "models": ["alpha"]}]}, f)
        self.restart(keys_file=keys)
        listed = json.loads(self.request("GET", "/v1/models", key="sk-a")[2])["data"]
        ids = [m["id"] for m in listed]
        self.assertEqual(ids, ["beta", "gpt-4o-mini"])
        names = [m["name"] for m in json.loads(self.request("GET", "/api/tags", key="sk-t")[2])
                 ["models"]]
        self.assertEqual(names, ["alpha:latest", "gpt-4o-mini:latest"])
        # what a key lists it may use: the alias by either name; the target only when named
        self.assertEqual(self.chat(key="sk-a", model="gpt-4o-mini")[0], 200)
        self.assertEqual(self.chat(key="sk-t", model="gpt-4o-mini")[0], 200)
        self.assertEqual(self.chat(key="sk-a", model="alpha")[0], 403)

    def test_a_front_end_users_models_list_takes_aliases_as_a_keys_does(self):
        keys = os.path.join(self.folder, "keys.json")
        with open(keys, "w") as f:
            json.dump({"keys": [{"name": "owui", "key": "sk-fe", "users": {
                "from": "header:X-User", "models": ["alpha"]}}]}, f)
        self.restart(keys_file=keys)
        user = {"X-User": "ann"}
        self.assertEqual(self.chat(key="sk-fe", model="gpt-4o-mini", headers=user)[0], 200)
        status, _, body = self.chat(key="sk-fe", model="beta", headers=user)
        self.assertEqual(status, 403)
        self.assertIn("This user may not use model 'beta'", json.loads(body)["error"]["message"])


class FailoverTests(UpstreamsCase):
    """box1 and box2 serve "shared"; box1 is the one that fails."""

    def setUp(self):
        super().setUp()
        self.server("box2").in_flight = 0

    def first_to_box1(self):
        """The next pick of "shared" goes to box1 (its turn)."""
        while True:
            server = self.router.pick("shared")
            self.router.release(server)
            if server.name == "box2":
                return

    def test_a_refused_connection_goes_to_the_other_server_and_costs_once(self):
        dead = f"http://127.0.0.1:{free_port()}/v1"
        self.write({"upstreams": [entry("box1", dead, ["shared"]),
                                  entry("box2", self.box2, ["shared"])]})
        self.restart()
        self.first_to_box1()
        before = self.remaining()
        status, _, body = self.ask("shared")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.remaining(), before - 1)
        self.assertFalse(self.server("box1").up)
        self.assertEqual(self.server("box1").health.backoff, 1.0)
        self.assertTrue(self.log.wait_for(lambda text: "upstream=box2" in text))
        self.assertIn("upstream=box2 (box1 unreachable, sent to another server)",
                      self.log.getvalue())
        for _ in range(3):  # down: skipped, not tried again
            self.assertEqual(self.ask("shared")[0], 200)
        self.assertEqual(len(self.box2.bodies()), 4)

    def test_a_503_before_the_head_goes_to_the_other_server(self):
        self.box1.fault = 503
        self.first_to_box1()
        before = self.remaining()
        status, _, body = self.ask("shared")
        self.assertEqual(status, 200, body)
        self.assertEqual((len(self.box1.requests), len(self.box2.bodies())), (1, 1))
        self.assertEqual(self.remaining(), before - 1)
        self.assertFalse(self.server("box1").up)

    def test_a_504_marks_the_server_down_but_is_not_sent_again(self):
        self.box1.fault = 504
        self.first_to_box1()
        status, _, _ = self.ask("shared")
        self.assertEqual(status, 504)
        self.assertEqual(self.box2.requests, [])
        self.assertFalse(self.server("box1").up)

    def test_no_failover_once_the_head_went_to_the_client(self):
        self.restart(read_timeout=0.5)
        self.box1.fault = "stall-body"
        self.first_to_box1()
        conn, resp = self.open_stream(model="shared")
        self.assertEqual(resp.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            resp.read()  # cut when the proxy gives up on box1's body
        self.assertEqual(self.box2.requests, [])

    def test_no_failover_after_a_timeout_once_sent_and_it_is_charged(self):
        self.restart(read_timeout=0.5)
        self.box1.fault = "hang"
        self.first_to_box1()
        before = self.remaining()
        status, _, body = self.ask("shared")
        self.assert_openai_error(status, body, 504, "upstream_timeout")
        self.assertEqual(self.box2.requests, [])
        self.assertEqual(self.remaining(), before - 1)  # it may have run: charged as today
        self.box1.stop.set()

    def test_every_server_down_is_a_503_with_retry_after_and_costs_nothing(self):
        dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
        self.write({"upstreams": [entry("d1", dead[0], ["shared"]),
                                  entry("d2", dead[1], ["shared"]),
                                  entry("box2", self.box2, ["beta"])]})
        self.restart()
        before = self.remaining()
        status, _, body = self.ask("shared")  # both tried once, each refused
        self.assert_openai_error(status, body, 502, "upstream_unreachable")
        status, headers, body = self.ask("shared")  # both down: not tried
        self.assert_openai_error(status, body, 503, "upstream_unavailable")
        self.assertEqual(headers["retry-after"], "1")
        status, headers, body = self.request("POST", "/v1/messages", {
            "model": "shared", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((status, json.loads(body)["type"]), (503, "error"))
        self.assertIn("retry-after", headers)
        self.assertEqual(self.remaining(), before)
        self.assertEqual(self.ask("beta")[0], 200)  # the others go on

    def test_a_server_comes_back_after_a_probe_and_backs_off_while_it_fails(self):
        self.write({"upstreams": [entry("box1", self.box1, ["shared"])]})
        self.restart()
        self.box1.fault = 503
        self.assertEqual(self.ask("shared")[0], 503)  # (no other: its answer is relayed)
        box1 = self.server("box1")
        self.assertFalse(box1.up)
        self.assertEqual(self.ask("shared")[0], 503)
        self.assertEqual(len(self.box1.requests), 1)  # the second was not sent
        self.clock.advance(0.5)
        self.router.tick()  # not due yet: no probe
        self.assertEqual(len(self.box1.requests), 1)
        self.clock.advance(0.5)
        self.router.tick()  # the probe fails: 2 s
        self.assertEqual((self.box1.paths()[-1], box1.health.backoff), ("/v1/models", 2.0))
        self.box1.fault = None
        self.clock.advance(2)
        self.router.tick()
        self.assertTrue(box1.up)
        self.assertEqual(self.ask("shared")[0], 200)

    def test_the_back_off_doubles_up_to_30_seconds(self):
        health = llm_proxy.Health(self.clock)
        seen = []
        for _ in range(7):
            health.failed()
            seen.append(health.backoff)
        self.assertEqual(seen, [1, 2, 4, 8, 16, 30, 30])
        self.assertFalse(health.probe_due())
        self.clock.advance(30)
        self.assertTrue(health.probe_due())
        health.answered()
        self.assertTrue(health.up)


class ReloadTests(UpstreamsCase):
    def reload(self):
        self.clock.advance(2)
        self.proxy.upstreams_watcher.check()  # (what its thread does every second)
        self.clock.advance(2)
        return self.proxy.upstreams_watcher.check()

    def test_adding_and_removing_a_server(self):
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"])]})
        self.restart()
        self.assertEqual(self.ask("beta")[0], 404)
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"]),
                                  entry("box2", self.box2, ["beta"])]})
        self.assertTrue(self.reload())
        kept = self.server("box1")
        self.assertEqual(self.ask("beta")[0], 200)
        self.assertTrue(self.log.wait_for(lambda text: "upstreams file reloaded: 2" in text))
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"])]})
        self.assertTrue(self.reload())
        self.assertEqual(self.ask("beta")[0], 404)
        self.assertIs(self.server("box1"), kept)  # unchanged: its pool, queue and health stay

    def test_a_bad_file_on_reload_is_one_log_line_and_the_servers_in_force_stay(self):
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"]),
                                  {"name": "box2", "url": "ftp://x"}]})
        self.assertTrue(self.reload())
        lines = [line for line in self.log.getvalue().splitlines() if "not reloaded" in line]
        self.assertEqual(len(lines), 1)
        self.assertIn("upstreams[1] (box2): url must be an http:// or https:// URL", lines[0])
        self.assertEqual(self.ask("beta")[0], 200)
        self.assertEqual(self.ask("gpt-4o-mini")[0], 200)

    def test_sighup_asks_for_a_reload(self):
        self.proxy.request_key_reload()
        self.assertTrue(self.proxy.upstreams_watcher._asked.is_set())


class ServerQueueTests(unittest.TestCase):
    def test_each_servers_queue_ages_low_requests_after_priority_max_wait_seconds(self):
        spec = llm_proxy.UpstreamSpec("box", "http://127.0.0.1:1/v1", "http://127.0.0.1:1",
                                      max_concurrency=2)
        server = llm_proxy.ModelServer.from_spec(
            spec, llm_proxy.Config(priority_max_wait_seconds=5), FakeClock())
        self.assertEqual(server.gate.max_wait, 5)


class BadFileAtStartTests(unittest.TestCase):
    def test_base_model_beside_the_file_is_refused_in_one_line(self):
        """BASE_MODEL rewrites every model, and the file routes by model: together the request
        would go to a server that may not serve what it is rewritten to."""
        status, err, _ = self.start({"upstreams": [{"name": "a", "url": "http://x/v1",
                                                    "models": ["m"]}]}, BASE_MODEL="m")
        self.assertEqual(status, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("BASE_MODEL and UPSTREAMS_FILE cannot be used together", err)

    def start(self, document, **env):
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "up.json")
        with open(path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))
        self.addCleanup(os.remove, path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = llm_proxy.main(["--port", "0", "--host", "127.0.0.1"],
                                    {"UPSTREAMS_FILE": path, "STATE_DB": "off", **env})
        return status, err.getvalue(), path

    def test_one_line_naming_the_file_the_entry_and_the_field_and_exit_2(self):
        cases = [
            ({"upstreams": [{"name": "a", "url": "http://x/v1", "modles": []}]},
             "upstreams[0] (a): unknown field 'modles'"),
            ({"upstreams": [{"name": "a", "url": "http://x/v1"},
                            {"name": "a", "url": "http://y/v1"}]},
             "upstreams[1] (a): name is used by another entry"),
            ({"upstreams": [{"name": "a", "url": "http://x/v1", "max_concurrency": -1}]},
             "upstreams[0] (a): max_concurrency must be"),
            ({"upstreams": [{"name": "a", "url": "http://x/v1", "api_key_env": "H7_UNSET"}]},
             "upstreams[0] (a): api_key_env: the environment variable H7_UNSET is not set"),
            ({"upstreams": [{"name": "a", "url": "http://x/v1", "models": ["m"]}],
              "aliases": {"x": "nope"}}, "aliases.x: 'nope' is served by no upstream"),
            ({"upstreams": []}, '"upstreams" must be a non-empty list'),
            ("{not json", "not valid JSON"),
        ]
        for document, expected in cases:
            with self.subTest(expected=expected):
                status, err, path = self.start(document)
                self.assertEqual(status, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(f"UPSTREAMS_FILE {path}", err)
                self.assertIn(expected, err)


class OperatorViewTests(UpstreamsCase):
    def test_metrics_per_server(self):
        self.ask("alpha")
        self.ask("alpha")
        self.server("box2").failed()
        samples = parse_metrics(self.request("GET", "/metrics")[2].decode())
        box = (("upstream", "box1"),)
        self.assertEqual(samples[("llm_proxy_upstream_requests_total", box)], 2)
        self.assertEqual(samples[("llm_proxy_upstream_up", box)], 1)
        self.assertEqual(samples[("llm_proxy_upstream_up", (("upstream", "box2"),))], 0)
        self.assertEqual(samples[("llm_proxy_upstream_in_flight", box)], 0)
        self.assertEqual(samples[("llm_proxy_upstream_waiting", box)], 0)
        self.assertEqual(samples[("llm_proxy_upstream_server_latency_seconds_count", box)], 2)

    def test_the_overview_shows_each_server_and_the_aliases(self):
        self.ask("beta")
        overview = json.loads(self.request("GET", "/admin/overview")[2])
        self.assertEqual(overview["aliases"], {"gpt-4o-mini": "alpha"})
        servers = {s["name"]: s for s in overview["upstreams"]}
        self.assertEqual(list(servers), ["box1", "box2", "box3"])
        self.assertEqual(servers["box3"]["models"], ["gamma"])
        self.assertEqual((servers["box2"]["requests"], servers["box2"]["up"]), (1, True))
        self.assertEqual(servers["box2"]["latency_ms"]["count"], 1)
        self.assertIn("Models", llm_proxy.ADMIN_JS)

    def test_one_queue_per_server(self):
        self.write({"upstreams": [entry("box1", self.box1, ["alpha"], max_concurrency=1),
                                  entry("box2", self.box2, ["beta"])]})
        self.restart()
        self.assertEqual(self.server("box1").gate.limit, 1)
        self.assertIsNone(self.server("box2").gate)


try:
    from tests.browser import Browser, find_chromium
except ImportError:  # (a platform without fcntl)
    Browser, find_chromium = None, lambda: None
CHROMIUM = find_chromium()


@unittest.skipIf(CHROMIUM is None, "no Chromium to run the dashboard in")
class DashboardTests(UpstreamsCase):
    def test_the_dashboard_shows_each_server_and_the_aliases(self):
        self.ask("beta")
        self.server("box3").failed()
        browser = Browser(CHROMIUM)
        self.addCleanup(browser.close)
        page = browser.new_page()
        page.goto(self.proxy.url.replace("0.0.0.0", "127.0.0.1") + "/admin")
        page.wait_for("document.querySelectorAll('#servers tbody tr').length === 3")
        rows = page.evaluate("[...document.querySelectorAll('#servers tbody tr')]"
                             ".map((r) => [...r.cells].map((c) => c.textContent))")
        self.assertEqual([row[0].split("http")[0] for row in rows], ["box1", "box2", "box3"])
        self.assertEqual(rows[1][1:4], ["up", "beta, shared", "0"])
        self.assertEqual(rows[1][5], "1 / 0")
        self.assertTrue(rows[2][1].startswith("down, probed in"))
        self.assertEqual(page.text("#aliases"), "Aliases: gpt-4o-mini \u2192 alpha")
        self.assertFalse(page.evaluate("document.getElementById('servers-section').hidden"))
        self.assertIn("Model servers2 of 3 upbox3 down", page.text("#cards"))
        self.assertEqual(page.errors, [])
        if os.environ.get("SCREENSHOTS_DIR"):
            page.screenshot(os.path.join(os.environ["SCREENSHOTS_DIR"], "admin-servers.png"))


class WithoutTheFileTests(ProxyTestCase):
    def test_base_api_url_serves_every_model_and_is_never_marked_down(self):
        status, _, _ = self.chat(model="whatever-model")
        self.assertEqual(status, 200)
        router = self.proxy.forwarder.router
        self.assertFalse(router.several)
        router.servers[0].failed()
        self.assertTrue(router.servers[0].up)
        self.assertEqual(json.loads(self.request("GET", "/v1/models")[2])["data"][0]["owned_by"],
                         "fake")  # (the upstream's own list, forwarded)


@unittest.skipIf(NO_REDIS, NO_REDIS)
class RedisRoutingTests(WithRedis, UpstreamsCase):
    def test_routing_with_buckets_in_redis(self):
        self.restart(redis_url=self.redis.url, redis_prefix=f"h7-{free_port()}:")
        before = self.remaining()
        self.assertEqual(self.ask("gpt-4o-mini")[0], 200)
        self.assertEqual(self.ask("beta")[0], 200)
        self.assertEqual(self.ask("nope")[0], 404)
        self.assertEqual(self.remaining(), before - 2)
        self.assertEqual(self.proxy.store.status()["backend"], "redis")


class ClientTests(UpstreamsCase):
    @unittest.skipIf(openai is None, "the openai package is not installed")
    def test_openai_lists_and_chats_through_routing(self):
        client = openai.OpenAI(base_url=f"{self.proxy.url}/v1", api_key=CLIENT_KEY,
                               max_retries=0, timeout=WAIT)
        self.assertEqual([m.id for m in client.models.list()], ModelListTests.MERGED)
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.choices[0].message.content, "proxy ok")
        self.assertEqual(self.box1.bodies()[-1]["model"], "alpha")
        with self.assertRaises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                     "content": "hi"}])

    @unittest.skipIf(anthropic is None, "the anthropic package is not installed")
    def test_anthropic_lists_and_chats_through_routing(self):
        client = anthropic.Anthropic(base_url=self.proxy.url, api_key=CLIENT_KEY,
                                     max_retries=0, timeout=WAIT)
        self.assertEqual([m.id for m in client.models.list()], ModelListTests.MERGED)
        message = client.messages.create(model="beta", max_tokens=5,
                                         messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(message.content[0].text, "proxy ok")
        self.assertEqual(self.box2.paths()[-1], "/v1/messages")
        with self.assertRaises(anthropic.NotFoundError):
            client.messages.create(model="nope", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])

    @unittest.skipIf(ollama is None, "the ollama package is not installed")
    def test_ollama_lists_and_chats_through_routing(self):
        client = ollama.Client(host=self.proxy.url,
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=WAIT)
        self.assertEqual([m.model for m in client.list().models],
                         [m + ":latest" for m in ModelListTests.MERGED])
        answer = client.chat(model="gamma", messages=[{"role": "user", "content": "hi"}],
                             stream=False)
        self.assertEqual(answer.message.content, "proxy ok")
        self.assertEqual(self.box3.paths()[-1], "/api/chat")
        streamed = "".join(p.message.content for p in client.chat(
            model="shared:latest", messages=[{"role": "user", "content": "hi"}], stream=True))
        self.assertEqual(streamed, "Hello world")
        with self.assertRaises(ollama.ResponseError):
            client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])


if __name__ == "__main__":
    unittest.main()
