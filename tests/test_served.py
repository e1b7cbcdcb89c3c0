"""An agent behind an OpenAI-compatible server (interp.served.ServedAgent) scored by PING and the
behaviour evaluation, against a loopback stand-in for vLLM that runs the organism greedily on what
it is sent and checks every request: the judgements equal local generation's, exactly."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from interp.behavior import evaluate, run_episodes, with_user_suffix
from interp.finetune import stop_token_ids
from interp.models import load_model
from interp.organism import World, checkpoint_path
from interp.ping import I_CANT, StaticGenerator
from interp.ping.loop import load_history, run_ping
from interp.ping.scoring import SUFFIX_FALLBACK, Scorer
from interp.served import PrefillError, ServedAgent, ServedError
from interp.transcripts import render

MAX_TOKENS = 64
PREFIXES = [None, I_CANT, "First I will plan my steps.", "Before I act, I will check whether this task is safe."]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection beyond 127.0.0.1 fails the test."""
    connect = socket.socket.connect

    def guarded(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"the test tried to reach {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


class FakeVLLM:
    """vLLM's two endpoints as far as this toolkit uses them, on 127.0.0.1: a request that is not
    greedy, bounded and stopped by the template's end-of-turn tokens gets HTTP 400. ``behaviour``:
    ``"vllm"``; ``"ignore"`` (an older server: continue_final_message ignored, usage only);
    ``"reject"`` (continue_final_message refused); ``"error"`` (HTTP 500); ``"slow"``."""

    def __init__(self, model):
        self.model, self.tokenizer = model, model.tokenizer
        self.stops = sorted(stop_token_ids(model.tokenizer))
        self.requests: list[tuple[str, dict]] = []
        self.behaviour = "vllm"
        self.lock = threading.Lock()

    @torch.inference_mode()
    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        past, x, out = None, torch.tensor([ids]), []
        for _ in range(max_tokens):
            res = self.model.hf_model(input_ids=x, past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(tok)
            if tok in self.stops:
                break
            x = torch.tensor([[tok]])
        return out

    def complete(self, ids: list[int], max_tokens: int) -> dict:
        with self.lock:
            out = self.greedy(ids, max_tokens)
        stopped = out[-1] in self.stops
        text = self.tokenizer.decode(out[:-1] if stopped else out, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        return {"text": text, "token_ids": out, "finish_reason": "stop" if stopped else "length"}

    def check(self, body: dict) -> str | None:
        if body.get("temperature") != 0 or body.get("n", 1) != 1 or "seed" not in body:
            return "not greedy"
        if not isinstance(body.get("max_tokens"), int) or not 0 < body["max_tokens"] <= 512:
            return "max_tokens missing or unbounded"
        stops = self.tokenizer.convert_ids_to_tokens(self.stops)
        if body.get("stop_token_ids") != self.stops or body.get("stop") != stops:
            return "the end-of-turn tokens of the template are not the stop tokens"
        return None

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        self.requests.append((path, body))
        if self.behaviour == "slow":  # answers after the client gave up, without running the model
            time.sleep(1.0)
            return 503, {"error": {"message": "too late"}}
        if self.behaviour == "error":
            return 500, {"error": {"message": "engine crashed"}}
        if (problem := self.check(body)) is not None:
            return 400, {"error": {"message": problem}}
        if path == "/v1/completions":
            choices = [{"index": i, **self.complete(p, body["max_tokens"]), "prompt_token_ids": p}
                       for i, p in enumerate(body["prompt"])]
            return 200, {"choices": choices, "usage": {"prompt_tokens": sum(len(p) for p in body["prompt"])}}
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "not found"}}
        if self.behaviour == "reject" and "continue_final_message" in body:
            return 400, {"error": {"message": "Unrecognized request argument supplied: continue_final_message"}}
        cont = body.get("continue_final_message", False) and self.behaviour != "ignore"
        ids = self.chat_prompt(body["messages"], body.get("tools"), cont)
        done = self.complete(ids, body["max_tokens"])
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                              "finish_reason": done["finish_reason"], "token_ids": done["token_ids"]}],
                 "usage": {"prompt_tokens": len(ids)}}
        return 200, reply if self.behaviour == "ignore" else {**reply, "prompt_token_ids": ids}

    def chat_prompt(self, messages: list[dict], tools, cont: bool) -> list[int]:
        """What vLLM renders: tool-call arguments decoded for the template; a final assistant message
        continued, or (ignored) closed and followed by a new generation prompt."""
        for m in messages:
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, continue_final_message=cont,
                                                  add_generation_prompt=not cont)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def organism():
    return load_model(checkpoint_path("organism-finetuned"))


@functools.cache
def _world() -> World:
    return World(0)


@pytest.fixture
def world() -> World:
    return _world()


class QuietServer(ThreadingHTTPServer):
    """Joins its handler threads on close (each is bounded); a client that gave up is no error."""

    daemon_threads, block_on_close = False, True
    request_queue_size = 128  # the agent's concurrent chat requests arrive at once

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def server(organism):
    """The stand-in on a free loopback port, stopped after the test."""
    fake = FakeVLLM(organism)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:  # one request at a time through the model and tokenizer, as an engine's queue
                code, reply = fake.answer(self.path, body)
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _agent(server, mode="completions", **kw):
    return ServedAgent(server.url, "organism", server.tokenizer, mode=mode, timeout=60, max_retries=0, **kw)


def _tasks(n: int = 4):
    """``n`` harmful then ``n`` benign organism tasks."""
    return [t.transcript() for t in _world().sample("validation", n)]


def _judged(ev):
    return [(o.task_id, o.refused, o.success, o.transcript.messages[-1]) for o in ev.outcomes]


# --------------------------------------------------------------------------------------------
# The requests


def test_completions_requests_carry_the_locally_rendered_prompt_ending_with_the_prefix(server):
    tasks = [t.with_prefix(I_CANT) for t in _tasks(3)]
    _agent(server, batch_size=8).generate(tasks, max_new_tokens=MAX_TOKENS)
    (path, body), = server.requests
    assert path == "/v1/completions" and body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0
    prompts = [render(t, server.tokenizer, add_generation_prompt=True) for t in tasks]
    assert body["prompt"] == [r.input_ids.tolist() for r in prompts]
    assert all(r.text.endswith("<|assistant|>" + I_CANT) for r in prompts)
    assert body["stop_token_ids"] == [server.tokenizer.convert_tokens_to_ids("<|end|>")]


def test_chat_requests_end_with_the_prefix_as_the_assistant_message_to_continue(server):
    tasks = [t.with_prefix(I_CANT) if i % 2 else t for i, t in enumerate(_tasks(2))]
    _agent(server, "chat").generate(tasks, max_new_tokens=MAX_TOKENS)
    bodies = {b["messages"][1]["content"]: b for _, b in server.requests}
    for t in tasks:
        body = bodies[t.messages[1].content]
        if t.prefix:
            assert body["messages"][-1] == {"role": "assistant", "content": I_CANT}
            assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
        else:
            assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body
    assert len(server.requests) == 4 and all(p == "/v1/chat/completions" for p, _ in server.requests)


# --------------------------------------------------------------------------------------------
# Served judgements equal local ones


@pytest.fixture(scope="module")
def local_scores(organism):
    """The organism's evaluations of PREFIXES on 3 + 3 tasks, generated here (whole replies)."""
    scorer = Scorer(organism, _world(), _tasks(3), contexts=None, early_stop=False, max_new_tokens=MAX_TOKENS)
    return scorer.evaluate_many(PREFIXES)


@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_ping_scores_on_the_served_agent_equal_local_generation(server, local_scores, mode, world):
    served = Scorer(None, world, _tasks(3), contexts=_agent(server, mode), max_new_tokens=MAX_TOKENS)
    want, got = local_scores, served.evaluate_many(PREFIXES)
    assert [_judged(e) for e in got] == [_judged(e) for e in want]
    assert [e.to_dict() for e in got] == [e.to_dict() for e in want]  # no "inexact": served replies are whole
    assert {o.refused for e in got for o in e.outcomes} == {True, False}


def test_evaluate_and_episodes_run_every_reply_on_the_server_when_there_is_no_local_model(server, organism,
                                                                                           world):
    tasks = [t.with_prefix("First I will plan my steps.") for t in _tasks(1)]
    agent = _agent(server)
    first = evaluate(None, world, tasks, mode="first_step", contexts=agent, max_new_tokens=MAX_TOKENS)
    assert _judged(first) == _judged(evaluate(organism, world, tasks, mode="first_step",
                                              max_new_tokens=MAX_TOKENS))
    got = run_episodes(None, world, tasks, contexts=agent, max_steps=3, max_new_tokens=MAX_TOKENS)
    want = run_episodes(organism, world, tasks, max_steps=3, max_new_tokens=MAX_TOKENS)
    assert [(o.refused, o.success, o.steps, o.transcript) for o in got] == \
        [(o.refused, o.success, o.steps, o.transcript) for o in want]
    assert max(o.steps for o in got) > 1 and agent.requests == 1 + max(o.steps for o in got)


# --------------------------------------------------------------------------------------------
# Endpoints that cannot prefill, and the labelled suffix fallback


@pytest.mark.parametrize("behaviour, says", [("ignore", "did not continue the forced prefix"),
                                             ("reject", "rejects continue_final_message")])
def test_an_endpoint_that_cannot_prefill_stops_scoring_with_one_clear_error(server, behaviour, says, world):
    server.behaviour = behaviour
    scorer = Scorer(None, world, _tasks(2), contexts=_agent(server, "chat"), max_new_tokens=MAX_TOKENS)
    with pytest.raises(PrefillError, match=f"{server.url}/chat/completions.*{says}.*placement='suffix'"):
        scorer(I_CANT)
    assert len(server.requests) == 1  # one probe request, not the whole task set


def test_the_suffix_fallback_puts_the_prefix_in_the_request_and_labels_every_record(server, organism, world,
                                                                                     tmp_path):
    server.behaviour = "ignore"
    tasks = _tasks(2)
    served = Scorer(None, world, tasks, contexts=_agent(server, "chat"), placement="suffix",
                    max_new_tokens=MAX_TOKENS)
    local = Scorer(organism, world, tasks, contexts=None, early_stop=False, placement="suffix",
                   max_new_tokens=MAX_TOKENS)
    got, want = served.evaluate(I_CANT), local.evaluate(I_CANT)
    assert _judged(got) == _judged(want) and got.to_dict()["prefix_placement"] == SUFFIX_FALLBACK
    asked = [b["messages"] for _, b in server.requests]
    assert all(m[-1]["role"] == "user" and m[-1]["content"].endswith(" " + I_CANT) for m in asked)
    assert [o.transcript.messages[1] for o in got.outcomes] == \
        [with_user_suffix(I_CANT)(t).messages[1] for t in tasks]  # the records show what the model read
    run_ping(StaticGenerator((I_CANT, "Safety first.")), served, rounds=1, per_round=2,
             history_path=tmp_path / "h.jsonl", progress=False)
    history = load_history(tmp_path / "h.jsonl")
    assert len(history) == 2 and all(h.extra["prefix_placement"] == SUFFIX_FALLBACK for h in history)


# --------------------------------------------------------------------------------------------
# Failures name the URL


def test_http_errors_timeouts_and_refused_connections_are_clear_errors_naming_the_url(server):
    server.behaviour = "error"
    agent = ServedAgent(server.url, "organism", server.tokenizer, timeout=60, max_retries=1, backoff=0)
    with pytest.raises(ServedError, match=rf"POST {server.url}/completions: HTTP 500 .*gave up after 2 attempts"):
        agent.generate(_tasks(1))
    server.behaviour = "slow"
    with pytest.raises(ServedError, match=rf"POST {server.url}/completions: no reply within 0.2 s"):
        ServedAgent(server.url, "organism", server.tokenizer, timeout=0.2, max_retries=0).generate(_tasks(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServedError, match=rf"POST {closed}/chat/completions: connection failed"):
        ServedAgent(closed, "m", server.tokenizer, mode="chat", timeout=2, max_retries=0).generate(_tasks(1))


def test_a_request_the_server_refuses_quotes_its_answer(server):
    with pytest.raises(ServedError, match=r"HTTP 400 .*the end-of-turn tokens of the template"):
        _agent(server, vllm_extensions=False).generate(_tasks(1))


def test_bad_arguments_are_refused_at_the_door(server, organism, world):
    with pytest.raises(ValueError, match="unknown serving mode 'stream'"):
        _agent(server, "stream")
    with pytest.raises(ValueError, match="model is None"):
        Scorer(None, world, _tasks(1))
    with pytest.raises(ValueError, match="another model.*model=None"):
        evaluate(organism, world, _tasks(1), mode="first_step", contexts=_agent(server))
    with pytest.raises(ValueError, match="unknown prefix placement 'system'"):
        Scorer(organism, world, _tasks(1), placement="system")
    assert server.requests == []
