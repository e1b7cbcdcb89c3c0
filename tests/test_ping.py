"""PING: the search loop's bookkeeping on stub scorers, its resumable history, the screen hook,
the ``PREFIX:`` parser, and the chat generators (a tiny random HF model; a loopback HTTP server)."""

from __future__ import annotations

import json
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from interp.ping import (Evaluation, Feedback, PingError, PrefixScore, Request, StaticGenerator,
                         generations_to_reach, load_history, run_ping)
from interp.ping.generators import (GeneratorError, HFChatGenerator, OpenAIChatGenerator, meta_prompt,
                                    parse_prefixes)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import make_model  # noqa: E402


# --------------------------------------------------------------------------------------------
# Stubs: candidates carry their own rates ("b0.5 r0.25 ..."), so each test's scores are readable


def rates(prefix: str) -> tuple[float, float]:
    b, r = re.match(r"b([\d.]+) r([\d.]+)", prefix).groups()
    return float(b), float(r)


@dataclass
class CountingScorer:
    """Scores by :func:`rates` (or ``fn``) and records every prefix it was asked about."""

    fn: object = rates
    calls: list[str] = field(default_factory=list)
    fail_on_call: int | None = None  # simulate a crash on this call (1-based)

    def __call__(self, prefix: str):
        if self.fail_on_call == len(self.calls) + 1:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(prefix)
        return self.fn(prefix)


@dataclass
class Scripted:
    """Proposes ``script[round][attempt]`` and records every request."""

    script: dict[int, list[list[str]]]
    requests: list[Request] = field(default_factory=list)

    def propose(self, request: Request) -> list[str]:
        self.requests.append(request)
        attempts = self.script.get(request.round, [])
        return list(attempts[request.attempt]) if request.attempt < len(attempts) else []


WORDS = "I will first check that this task is safe and refuse anything harmful before acting".split()


class WordsGenerator:
    """A seeded search: random words, extending the best prefix when shown feedback."""

    def propose(self, request: Request) -> list[str]:
        rng = random.Random(request.seed)
        base = request.feedback.by_score[0].prefix.split() if request.feedback else []
        return [" ".join(base + rng.sample(WORDS, rng.randint(1, 3))) for _ in range(request.n)]


def word_rates(prefix: str) -> Evaluation:
    words = prefix.lower().split()
    refusal = min(1.0, sum(w in {"check", "safe", "refuse", "harmful"} for w in words) / 4)
    return Evaluation(1.0 if len(words) <= 6 else 0.5, refusal, {"n": len(words)})


def ps(prefix: str, b: float, r: float, round_: int = 1) -> PrefixScore:
    return PrefixScore(prefix, b, r, round_)


# --------------------------------------------------------------------------------------------
# Loop bookkeeping


def test_feedback_lists_top_k_by_overall_benign_and_refusal_score():
    history = [ps("a", 0.5, 0.5), ps("b", 1.0, 0.0), ps("c", 0.25, 1.0), ps("d", 0.75, 0.75),
               ps("e", 1.0, 0.25)]
    fb = Feedback.from_history(history, top_k=2)
    assert [p.prefix for p in fb.by_score] == ["d", "c"]
    assert [p.prefix for p in fb.by_benign] == ["e", "b"]  # tie on benign 1.0: higher overall first
    assert [p.prefix for p in fb.by_refusal] == ["c", "d"]


@pytest.mark.parametrize("tau, rounds_with_feedback", [(1.5, [3, 4]), (0.0, [2, 3, 4]), (2.0, [])])
def test_feedback_is_shown_from_round_2_once_the_best_score_reaches_tau(tau, rounds_with_feedback):
    gen = Scripted({1: [["b0.5 r0.5 one"]], 2: [["b1 r0.5 two"]], 3: [["b0.25 r0.25 three"]],
                    4: [["b0.5 r0 four"]]})
    res = run_ping(gen, rates, rounds=4, per_round=1, tau=tau, progress=False)
    assert [q.round for q in gen.requests if q.feedback is not None] == rounds_with_feedback
    assert [p.round for p in res.history if p.feedback] == rounds_with_feedback


def test_a_best_score_equal_to_tau_up_to_float_rounding_reaches_it():
    assert 0.7 + 0.1 < 0.8  # the sum lands one ulp under
    gen = Scripted({1: [["b0.7 r0.1 one"]], 2: [["b0 r0 two"]]})
    run_ping(gen, rates, rounds=2, per_round=1, tau=0.8, progress=False)
    assert gen.requests[1].feedback is not None


def test_generator_is_shown_the_top_k_of_everything_scored_before_the_round():
    gen = Scripted({1: [["b1 r0.5 a", "b0 r1 b", "b0.5 r0.5 c"]], 2: [["b1 r1 d"]], 3: [["b0 r0 e"]]})
    res = run_ping(gen, rates, rounds=3, per_round=3, tau=1.0, top_k=2, progress=False)
    round3 = gen.requests[-1]
    assert round3.round == 3
    assert round3.feedback == Feedback.from_history(res.history[:4], top_k=2)
    assert [p.prefix for p in round3.feedback.by_score] == ["b1 r1 d", "b1 r0.5 a"]


def test_best_is_the_argmax_of_the_history_earliest_on_ties():
    gen = StaticGenerator(["b0.5 r0.5 x", "b1 r0.5 first", "b0.5 r1 second", "b0 r0 y"])
    res = run_ping(gen, rates, rounds=2, per_round=2, progress=False)
    assert [p.score for p in res.history] == [1.0, 1.5, 1.5, 0.0]
    assert res.best.prefix == "b1 r0.5 first"
    assert res.generations_used == 4


def test_duplicate_candidates_are_never_scored_twice():
    gen = Scripted({
        1: [["b1 r0 Hello world", "b1 r0 hello   WORLD", " b1 r0 Hello world "],
            ["B1 R0 HELLO WORLD", "b0 r1 second", "b0 r0 third"]],
        2: [["b0 r1 SECOND", "b0.5 r0 fourth"], ["b0.5 r0 fifth", "b0.5 r0 sixth"]],
    })
    scorer = CountingScorer()
    run_ping(gen, scorer, rounds=2, per_round=3, progress=False)
    assert scorer.calls == ["b1 r0 Hello world", "b0 r1 second", "b0 r0 third",
                            "b0.5 r0 fourth", "b0.5 r0 fifth", "b0.5 r0 sixth"]
    assert [(q.round, q.attempt) for q in gen.requests] == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_used_up_candidate_list_ends_the_run_with_a_warning():
    gen = StaticGenerator(["b1 r0 a", "b0 r1 b", "b1 r1 c"])
    with pytest.warns(UserWarning, match="round 3: the generator proposed no new candidate"):
        res = run_ping(gen, rates, rounds=10, per_round=2, progress=False)
    assert [p.prefix for p in res.history] == ["b1 r0 a", "b0 r1 b", "b1 r1 c"]
    assert [p.round for p in res.history] == [1, 1, 2]


def test_a_rate_outside_zero_one_is_rejected_naming_the_prefix():
    with pytest.raises(PingError, match=r"benign_success=1\.2 for prefix 'b1.2 r0 bad'"):
        run_ping(StaticGenerator(["b1.2 r0 bad"]), rates, rounds=1, per_round=1, progress=False)


def test_generations_to_reach_counts_scored_candidates_up_to_the_first_hit():
    history = [ps("a", 0.5, 0.5), ps("b", 1.0, 0.5), ps("c", 1.0, 1.0)]
    assert generations_to_reach(history, 1.5) == 2
    assert generations_to_reach(history, 2.0) == 3
    assert generations_to_reach(history[:2], 2.0) is None


def test_stop_at_ends_the_run_at_the_first_candidate_reaching_it_and_closes_its_round(tmp_path):
    gen = StaticGenerator(["b0.5 r0.5 a", "b1 r0.5 b", "b1 r1 c", "b0.5 r0 d", "b1 r1 e"])
    path = tmp_path / "ping.jsonl"
    scorer = CountingScorer()
    res = run_ping(gen, scorer, rounds=3, per_round=2, tau=3.0, stop_at=2.0, history_path=path, progress=False)
    assert scorer.calls == ["b0.5 r0.5 a", "b1 r0.5 b", "b1 r1 c"]
    assert generations_to_reach(res.history, 2.0) == 3
    closing = [json.loads(line) for line in path.read_text().splitlines()][-1]
    assert closing == {"kind": "round", "round": 2, "feedback": False, "screened": 0, "scored": 1, "stopped_at": 2.0}


def test_a_run_restarted_after_reaching_stop_at_scores_nothing_more(tmp_path):
    gen = StaticGenerator(["b1 r1 a", "b0 r0 b", "b0 r0 c"])
    path = tmp_path / "ping.jsonl"
    run_ping(gen, rates, rounds=3, per_round=1, stop_at=2.0, history_path=path, progress=False)
    scorer = CountingScorer()
    res = run_ping(gen, scorer, rounds=3, per_round=1, stop_at=2.0, history_path=path, progress=False)
    assert scorer.calls == []
    assert [p.prefix for p in res.history] == ["b1 r1 a"]


# --------------------------------------------------------------------------------------------
# Screen hook


def test_screen_sends_only_the_top_candidates_to_the_scorer():
    pool = [f"b0.5 r0.5 cand{i}" for i in range(6)]
    screen_value = {p: v for p, v in zip(pool, [0.1, 0.9, 0.3, 0.8, 0.2, 0.0])}
    gen, scorer = Scripted({1: [pool]}), CountingScorer()
    res = run_ping(gen, scorer, rounds=1, per_round=2, oversample=3,
                   screen=lambda cands: [screen_value[c] for c in cands], progress=False)
    assert gen.requests[0].n == 6
    assert scorer.calls == ["b0.5 r0.5 cand1", "b0.5 r0.5 cand3"]
    assert [p.screen for p in res.history] == [0.9, 0.8]
    assert (res.generations_used, res.screened) == (2, 6)


# --------------------------------------------------------------------------------------------
# History file and resumption


def test_history_file_holds_every_scored_candidate_with_its_scores(tmp_path):
    path = tmp_path / "ping.jsonl"
    res = run_ping(WordsGenerator(), word_rates, rounds=3, per_round=2, tau=1.0, history_path=path,
                   progress=False)
    assert load_history(path) == res.history
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["config"] + ["candidate", "candidate", "round"] * 3
    first = json.loads(path.read_text().splitlines()[1])
    assert first["score"] == first["benign_success"] + first["harmful_refusal"]
    assert first["extra"] == {"n": len(first["prefix"].split())}


def test_resume_after_a_crash_mid_round_rescores_nothing_and_ends_like_an_uninterrupted_run(tmp_path):
    kw = dict(rounds=5, per_round=3, tau=1.0, seed=3, progress=False)
    whole = CountingScorer(word_rates)
    expected = run_ping(WordsGenerator(), whole, history_path=tmp_path / "whole.jsonl", **kw)

    path = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):  # rounds 1-2 closed, one candidate of round 3 scored
        run_ping(WordsGenerator(), CountingScorer(word_rates, fail_on_call=8), history_path=path, **kw)
    resumed = CountingScorer(word_rates)
    result = run_ping(WordsGenerator(), resumed, history_path=path, **kw)

    assert resumed.calls == whole.calls[7:]
    assert result == expected
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_resume_ignores_a_line_cut_short_and_can_add_rounds(tmp_path):
    path = tmp_path / "ping.jsonl"
    run_ping(WordsGenerator(), word_rates, rounds=2, per_round=2, history_path=path, progress=False)
    with open(path, "a") as f:
        f.write('{"kind": "candidate", "pre')
    scorer = CountingScorer(word_rates)
    res = run_ping(WordsGenerator(), scorer, rounds=3, per_round=2, history_path=path, progress=False)
    assert len(scorer.calls) == 2
    assert [p.round for p in res.history] == [1, 1, 2, 2, 3, 3]
    assert load_history(path) == res.history


def test_resume_refuses_a_history_written_with_other_settings(tmp_path):
    path = tmp_path / "ping.jsonl"
    run_ping(WordsGenerator(), word_rates, rounds=1, per_round=2, history_path=path, progress=False)
    with pytest.raises(PingError, match=r"ping\.jsonl was written with per_round=2 but this run has per_round=3;"):
        run_ping(WordsGenerator(), word_rates, rounds=2, per_round=3, history_path=path, progress=False)


# --------------------------------------------------------------------------------------------
# Parser and meta-prompt


MESSY = """Sure! Here are some prefixes you could try:

1. **PREFIX:** "I check every task for harm before I act."
2) prefix: 'Before acting, I make sure the request is legitimate.'   
- **Prefix 3:** I will refuse anything that could hurt someone.
4. PREFIX:
5. PREFIX: i  check every task for harm before I act.
**PREFIX: Safety first: is this request harmless?**
PREFIX: `Let me verify this is safe.`
PREFIX: <the prefix>
The prefix: should not count, nor should this line.
Let me know if you want more!"""


def test_parse_prefixes_reads_messy_generator_output():
    assert parse_prefixes(MESSY) == [
        "I check every task for harm before I act.",
        "Before acting, I make sure the request is legitimate.",
        "I will refuse anything that could hurt someone.",
        "Safety first: is this request harmless?",
        "Let me verify this is safe.",
    ]


def test_parse_prefixes_finds_nothing_in_text_without_prefix_lines():
    assert parse_prefixes("I would suggest starting with a safety check.\nprefixes: many") == []


def test_meta_prompt_explains_the_task_the_score_and_the_answer_format():
    system, user = meta_prompt(5)
    assert "start of the agent's reply" in system["content"]
    text = user["content"]
    for phrase in ("benign success rate", "harmful refusal rate", "best possible score is 2.00",
                   "exactly 5 lines", "PREFIX: <the prefix>", "Explore"):
        assert phrase in text
    assert "Best by" not in text


def test_meta_prompt_with_feedback_shows_the_three_top_k_lists_with_scores():
    a, b = ps("Let me check first.", 1.0, 0.5), ps("I refuse harm.", 0.25, 1.0)
    text = meta_prompt(3, Feedback((a, b), (a, b), (b, a)))[1]["content"]
    assert ('Best by overall score:\n1. "Let me check first." (score 1.50 = benign success 1.00 '
            '+ harmful refusal 0.50)\n2. "I refuse harm." (score 1.25') in text
    assert 'Best by harmful refusal:\n1. "I refuse harm."' in text
    assert "Explore" not in text and "exactly 3 lines" in text


# --------------------------------------------------------------------------------------------
# Hugging Face chat generator, on a tiny random Llama (its output is noise: this tests plumbing)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    model, tok = make_model("llama", tmp_path_factory.mktemp("tiny-llama"), n_ctx=4096)
    return HFChatGenerator(model, tok, max_new_tokens=12)


def test_hf_generator_renders_the_meta_prompt_with_the_models_chat_template(tiny_generator):
    text = tiny_generator.prompt(meta_prompt(4))
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou design prefixes")
    assert "exactly 4 lines" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_hf_generator_sampling_is_seeded_and_leaves_torchs_random_state_alone(tiny_generator):
    messages = meta_prompt(2)
    state = torch.get_rng_state()
    first, again, other = (tiny_generator.complete(messages, s) for s in (7, 7, 8))
    assert first == again != other
    assert torch.equal(torch.get_rng_state(), state)


def test_hf_generator_warns_and_proposes_nothing_when_the_reply_has_no_prefix_line(tiny_generator):
    with pytest.warns(UserWarning, match="HFChatGenerator: reply in round 2, attempt 1 has no 'PREFIX:' line"):
        assert tiny_generator.propose(Request(n=3, round=2, attempt=1, seed=0)) == []


# --------------------------------------------------------------------------------------------
# OpenAI-compatible generator against a fake server on loopback


def _completion(content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"index": 0, "message": message}]}).encode()


GOOD = "PREFIX: I will first check that the task is safe.\nPREFIX: Safety check, then the task."
REPLIES = {  # first path segment -> (status, body)
    "good": (200, _completion(GOOD)),
    "messy": (200, _completion(MESSY)),
    "error": (500, b"upstream exploded"),
    "missing": (404, b"no such model"),
    "notjson": (200, b"<html>gateway hiccup</html>"),
    "nochoices": (200, b'{"error": {"message": "quota"}}'),
    "slow": (200, _completion(GOOD)),
}


@pytest.fixture
def no_proxy(monkeypatch):
    """Loopback requests must not go through a proxy the environment may name."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(no_proxy):
    received, release = [], threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(SimpleNamespace(path=self.path, headers=dict(self.headers), body=body))
            mode = self.path.split("/")[1]
            if mode == "slow":
                release.wait(5)
            status, payload = REPLIES[mode]
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client timed out and hung up

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", received=received)
    release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_http_generator_posts_the_meta_prompt_from_env_settings_and_parses_the_reply(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/good/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    gen = OpenAIChatGenerator("tiny-gpt")
    assert gen.propose(Request(n=5, round=1, attempt=0, seed=123)) == [
        "I will first check that the task is safe.", "Safety check, then the task."]
    (req,) = server.received
    assert req.path == "/good/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-test"
    assert (req.body["model"], req.body["seed"], req.body["messages"]) == ("tiny-gpt", 123, meta_prompt(5))


def test_http_generator_keeps_the_first_n_prefixes_of_a_messy_reply(server):
    gen = OpenAIChatGenerator("m", base_url=server.url + "/messy/v1", api_key="")
    assert gen.propose(Request(n=3, round=1, attempt=0, seed=0)) == [
        "I check every task for harm before I act.",
        "Before acting, I make sure the request is legitimate.",
        "I will refuse anything that could hurt someone.",
    ]
    assert "Authorization" not in server.received[0].headers


def test_http_generator_retries_a_server_error_a_bounded_number_of_times(server):
    gen = OpenAIChatGenerator("m", base_url=server.url + "/error/v1", retries=2, backoff=0)
    with pytest.raises(GeneratorError) as e:
        gen.complete(meta_prompt(1), seed=0)
    assert str(e.value) == (f"POST {server.url}/error/v1/chat/completions: HTTP 500 Internal Server Error; "
                            "body starts 'upstream exploded' (gave up after 3 attempts)")
    assert len(server.received) == 3


def test_http_generator_does_not_retry_a_client_error(server):
    gen = OpenAIChatGenerator("m", base_url=server.url + "/missing/v1", retries=2, backoff=0)
    with pytest.raises(GeneratorError, match="HTTP 404 Not Found; body starts 'no such model'$"):
        gen.complete(meta_prompt(1), seed=0)
    assert len(server.received) == 1


@pytest.mark.parametrize("mode, problem", [("notjson", "reply is not JSON"),
                                           ("nochoices", "reply JSON has no text at choices")])
def test_http_generator_names_the_url_and_the_fault_of_a_malformed_reply(server, mode, problem):
    gen = OpenAIChatGenerator("m", base_url=f"{server.url}/{mode}/v1", retries=2, backoff=0)
    url = f"{server.url}/{mode}/v1/chat/completions"
    with pytest.raises(GeneratorError, match=re.escape(f"POST {url}: {problem}")):
        gen.complete(meta_prompt(1), seed=0)
    assert len(server.received) == 1


def test_http_generator_gives_up_on_a_server_slower_than_its_timeout(server):
    gen = OpenAIChatGenerator("m", base_url=server.url + "/slow/v1", timeout=0.3, retries=1, backoff=0)
    start = time.monotonic()
    with pytest.raises(GeneratorError, match=re.escape(
            f"POST {server.url}/slow/v1/chat/completions: no reply within 0.3 s (gave up after 2 attempts)")):
        gen.complete(meta_prompt(1), seed=0)
    assert time.monotonic() - start < 3
    assert len(server.received) == 2


def test_http_generator_reports_a_refused_connection(no_proxy):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = OpenAIChatGenerator("m", base_url=f"http://127.0.0.1:{port}/v1", retries=0)
    with pytest.raises(GeneratorError, match=f"127.0.0.1:{port}/v1/chat/completions: connection failed"):
        gen.complete(meta_prompt(1), seed=0)
