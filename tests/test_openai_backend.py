"""The `openai` backend against misbehaving servers: a tiny real HTTP server written here that answers
500s, 429s, or too slowly, and a port where nothing listens. (The backend against a real vLLM server is
tested in test_engines_server.py.) Retries happen, then one clear error; requests carry polyfuse's token
ids and per-request seeds, at most `concurrency` at a time, and the API key only from the environment."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import warm_python
from polyfuse.errors import ConfigError, UserError
from polyfuse.models import load_tokenizer, render_prompt
from polyfuse.sampling import SampledModel, SamplingParams, build_backend, request_seed
from test_ddp import free_port


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up or was killed: nothing to report
        pass


class Misbehaving:
    """A local server for `/v1/completions`: answers `plan[i]` to the i-th request ("500", "429", "slow",
    "hold": not before `release` is set, anything else a completion), records every request body and header,
    and the most requests in flight
    (from its arrival until its answer is sent). `together`: requests are answered only in groups of that many
    (a barrier; after 3 s without a full group, at once), each group held 0.2 s more once complete, so a client
    that allows more requests in flight has sent one more meanwhile (a correct client gives exactly `together`
    however slow the machine)."""

    def __init__(self, plan: list[str] | None = None, default: str = "ok", together: int | None = None):
        self.plan, self.default = list(plan or []), default
        self.barrier = threading.Barrier(together, action=lambda: time.sleep(0.2), timeout=3.0) if together else None
        self.release, self.held = threading.Event(), threading.Event()  # held: set when a request is held
        self.bodies: list[dict] = []
        self.headers: list[str | None] = []  # the Authorization header of each request
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    action = server.plan.pop(0) if server.plan else server.default
                    server.bodies.append(body)
                    server.headers.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    answer = len(server.bodies)
                try:
                    if action == "slow":
                        time.sleep(2.0)
                    if action == "hold":
                        server.held.set()
                        server.release.wait(timeout=60)
                    if server.barrier is not None:
                        with contextlib.suppress(threading.BrokenBarrierError):  # the count then tells
                            server.barrier.wait()
                finally:
                    with server.lock:  # before the answer: the client may send its next request at once
                        server.in_flight -= 1
                if action in ("500", "429"):
                    self.reply(int(action), {"error": {"message": f"planned {action}"}}, {"Retry-After": "0"})
                else:
                    choices = [{"index": k, "text": f" answer {answer}.{k} ", "finish_reason": "stop",
                                "logprobs": None} for k in range(body.get("n", 1))]
                    self.reply(200, {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                     "choices": choices})

            def reply(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*args, **kwargs) -> Misbehaving:
        servers.append(Misbehaving(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def model(world, url: str, **options) -> SampledModel:
    path = str(next(iter(world.source_paths.values())))
    return SampledModel.model_validate({"name": "served", "path": path, "backend": {
        "type": "openai", "base_url": url, "model": "toy", "max_retries": 2, "timeout": 5, **options}})


PARAMS = SamplingParams(n=2, temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_new_tokens=7, seed=11)


def test_requests_carry_token_ids_seeds_and_the_mapped_parameters(tiny_world, serve, monkeypatch):
    server = serve(together=3)  # 9 requests answered 3 at a time: exactly 3 in flight, if the client allows 3
    monkeypatch.setenv("TOY_KEY", "sk-secret-123")
    spec = model(tiny_world, server.url, api_key_env="TOY_KEY", concurrency=3)
    prompts = [f"prompt {i}" for i in range(9)]
    with build_backend(spec) as backend:
        texts = backend.generate_all(prompts, PARAMS)
    tokenizer = load_tokenizer(spec)
    by_prompt = {tuple(body["prompt"]): body for body in server.bodies}
    for i, prompt in enumerate(prompts):
        body = by_prompt[tuple(render_prompt(tokenizer, prompt)[0])]  # polyfuse's rendering, as token ids
        assert body["seed"] == request_seed(11, i)
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["repetition_penalty"],
                body["model"]) == (2, 0.7, 0.9, 7, 1.1, "toy")
    assert all(len(t) == 2 and t[0].startswith("answer") for t in texts)  # n texts each, stripped
    assert server.most_in_flight == 3  # bounded concurrency
    assert set(server.headers) == {"Bearer sk-secret-123"}
    assert "sk-secret" not in json.dumps(spec.model_dump())  # configs and manifests hold the variable's name only
    monkeypatch.delenv("TOY_KEY")
    with pytest.raises(ConfigError, match="environment variable TOY_KEY is not set"):
        build_backend(spec)


def test_stop_strings_are_sent_and_the_response_ends_before_them(tiny_world, serve):
    """The server gets OpenAI's `stop`; the text is cut before the earliest stop string as a server that applies
    it returns it (this one answers " answer N.K " whatever it is sent), so every backend gives the same text."""
    server = serve()
    with build_backend(model(tiny_world, server.url)) as backend:
        texts = backend.generate_all(["a", "b"], PARAMS.model_copy(update={"stop": [".", "never"]}))
        plain = backend.generate_all(["a"], PARAMS)
    assert [body["stop"] for body in server.bodies[:2]] == [[".", "never"]] * 2
    assert "stop" not in server.bodies[2]
    assert sorted(t for pair in texts for t in pair) == ["answer 1", "answer 1", "answer 2", "answer 2"]
    assert plain == [["answer 3.0", "answer 3.1"]]


def test_it_runs_inside_a_running_event_loop(tiny_world, serve):
    """From code that already runs an event loop (a Jupyter cell), where `asyncio.run` refuses."""
    import asyncio

    server = serve()

    async def cell() -> list[list[str]]:
        with build_backend(model(tiny_world, server.url)) as backend:
            return backend.generate_all(["first prompt", "second prompt"], PARAMS)

    texts = asyncio.run(cell())
    assert len(server.bodies) == 2 and sorted(t[0] for t in texts) == ["answer 1.0", "answer 2.0"]


def test_429_and_500_are_retried(tiny_world, serve):
    server = serve(plan=["429", "500"])
    with build_backend(model(tiny_world, server.url)) as backend:
        texts = backend.generate_all(["only prompt"], PARAMS)
    assert len(server.bodies) == 3 and texts[0][0] == "answer 3.0"


def test_500s_give_retries_then_one_clear_error(tiny_world, serve):
    server = serve(default="500")
    with build_backend(model(tiny_world, server.url)) as backend, pytest.raises(
        UserError, match=r"served: http://127.0.0.1:\d+/v1: the server answered 500 after 3 tries: planned 500"
    ):
        backend.generate_all(["a prompt"], PARAMS)
    assert len(server.bodies) == 3


def test_timeouts_give_retries_then_one_clear_error(tiny_world, serve):
    server = serve(default="slow")
    with build_backend(model(tiny_world, server.url, timeout=0.3, max_retries=1)) as backend, pytest.raises(
        UserError, match=r"no answer within 0.3 s after 2 tries \(backend.timeout\)"
    ):
        backend.generate_all(["a prompt"], PARAMS)
    assert len(server.bodies) == 2


def test_a_server_that_is_down_gives_retries_then_one_clear_error(tiny_world):
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.perf_counter()
    with build_backend(model(tiny_world, url)) as backend, pytest.raises(
        UserError, match=r"cannot connect after 3 tries .*; is the server running\?"
    ):
        backend.generate_all(["a prompt"], PARAMS)
    assert time.perf_counter() - started > 0.5  # it backed off between the tries


def test_a_killed_sample_stage_resumed_with_other_server_settings_resends_nothing(tiny_world, serve, tmp_path):
    """A recipe's sample stage through a server, killed after 5 answers (the 6th request held), run again with
    another concurrency, timeout, retries and address: the settings that do not change the answers are not in
    the stage's fingerprint, so its journal is kept and only the 7 requests it lacks are sent."""
    from polyfuse.data import SampleRow, read_rows, write_rows
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe

    prompts = tiny_world.prompts("train", per_domain=4)[:12]
    write_rows(tmp_path / "prompts.jsonl", prompts)
    first, second = serve(plan=["ok"] * 5, default="hold"), serve()
    source = {"name": "served", "path": str(next(iter(tiny_world.source_paths.values()))),
              "sampling": {"n": 1, "temperature": 0.7, "max_new_tokens": 4}}
    backend = {"type": "openai", "model": "toy", "base_url": first.url, "concurrency": 1}
    recipe = {"name": "resume", "work_dir": str(tmp_path / "work"), "stages": ["prompts", "sample"],
              "prompts": {"path": str(tmp_path / "prompts.jsonl")}, "sources": [{**source, "backend": backend}],
              "pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    journal = tmp_path / "work" / "sample" / "shards" / "served-00000.partial.jsonl"
    run = warm_python.start(["-m", "polyfuse", "run", tmp_path / "recipe.yaml", "-q"])  # in a warm child
    try:
        assert first.held.wait(timeout=120), "the run never reached the held request"
    finally:
        run.kill()  # SIGKILL
    assert journal.read_text().count("\n") == 5 and len(first.bodies) == 6

    backend.update(base_url=second.url, concurrency=4, timeout=30, max_retries=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), quiet=True)
    assert len(second.bodies) == len(prompts) - 5  # the journaled answers were kept, none was sent again
    samples = read_rows(tmp_path / "work" / "sample" / "samples.jsonl", SampleRow)
    assert [s.prompt_id for s in samples] == [p.id for p in prompts] and not journal.exists()
    sent = {tuple(body["prompt"]): body["seed"] for body in first.bodies[:5] + second.bodies}
    assert len(sent) == len(prompts)  # every prompt asked for once, with its own seed
