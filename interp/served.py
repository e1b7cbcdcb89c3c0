"""Models that run on another machine: an agent behind an OpenAI-compatible server (vLLM), whose
replies start with a forced prefix, and a model on NDIF, whose activations nnsight reads remotely.

:class:`ServedAgent` is a :class:`interp.generation.ReplySource`: give it as ``contexts`` to
:class:`interp.ping.scoring.Scorer` or to :func:`interp.behavior.evaluate` (the model argument
``None``: the server holds the model, only the tokenizer is here) and PING's loop and the
behaviour evaluation run on the served agent. Two ways to force the prefix:

- ``mode="completions"`` (default, exact): each prompt is rendered here by the model's own chat
  template (:func:`interp.transcripts.render`, the prefix right after the generation prompt) and
  sent as token ids to ``/completions``, many prompts per request: the server continues exactly
  the tokens :func:`interp.generation.generate` would run;
- ``mode="chat"``: ``/chat/completions`` with the prefix as a final assistant message and vLLM's
  ``continue_final_message=true, add_generation_prompt=false``; the server renders the prompt.

Every reply is checked against the prompt rendered here (the prompt tokens the server reports), so
an endpoint that does not continue the prefix (it ignores or rejects ``continue_final_message``)
stops the run with a :class:`PrefillError`; the paper's fallback for such API models, the prefix
text appended to the user's request, is ``Scorer(..., placement="suffix")``, labelled in its
records. Decoding is greedy (temperature 0, a fixed seed), bounded by ``max_tokens`` and stopped by
the template's end-of-turn tokens. A server cannot cut a reply mid-way, so early stopping
(``until``) is ignored: served replies are whole, and so all four rates are judged on whole replies.

:func:`load_remote` gives a :class:`interp.models.Model` whose weights stay on NDIF: its
:meth:`interp.models.Model.residual` (and so :func:`interp.cache.cache_activations`) runs as a
remote nnsight trace. See docs/served.md for the server command lines and the calls.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from interp.finetune import stop_token_ids
from interp.generation import Generation, Until
from interp.models import Model, check_choice, find_layers
from interp.transcripts import Message, Transcript, render
from interp.transcripts.labelling import render_real

Mode = Literal["completions", "chat"]
MODES: tuple[str, ...] = get_args(Mode)


class ServedError(RuntimeError):
    """No usable reply from the endpoint (HTTP error, timeout, malformed body); names the URL."""


class PrefillError(ServedError):
    """The endpoint does not continue a forced prefix as the start of the assistant's reply."""


FALLBACK_HINT = ("score with the prefix text appended to the user's request instead: the paper's suffix fallback, "
                 "Scorer(..., placement='suffix'), labelled in every record")


RETRY_STATUS = {408, 429, 500, 502, 503, 504}
"""HTTP statuses worth another try: timeouts, rate limits, server errors."""


def head(raw: bytes, n: int = 200) -> str:
    """The start of a server's answer, quoted, for error messages."""
    return repr(raw[:n].decode("utf-8", errors="replace"))


def post_json(url: str, body: Mapping[str, Any], *, api_key: str | None = None, timeout: float = 120.0,
              retries: int = 2, backoff: float = 1.0) -> Any:
    """POST ``body`` as JSON and return the decoded JSON reply. Timeouts, connection failures, 429
    and 5xx are retried ``retries`` times (``backoff`` × 2^attempt seconds apart); any failure is a
    :class:`ServedError` naming the URL (a 4xx quotes the start of the server's answer)."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers, method="POST"),
                                        timeout=timeout) as response:
                raw = response.read()
            break
        except urllib.error.HTTPError as e:
            with e:
                answer = e.read()
            if e.code not in RETRY_STATUS:
                raise _http_error(url, e.code, e.reason, answer, body) from None
            problem = f"HTTP {e.code} {e.reason}; body starts {head(answer)}"
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            reason = getattr(e, "reason", e)
            problem = (f"no reply within {timeout} s" if isinstance(reason, TimeoutError)
                       else f"connection failed ({reason})")
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    else:
        raise ServedError(f"POST {url}: {problem} (gave up after {retries + 1} attempts)")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServedError(f"POST {url}: reply is not JSON ({e}); it starts {head(raw)}") from None


def _http_error(url: str, code: int, reason: str, answer: bytes, body: Mapping[str, Any]) -> ServedError:
    problem = f"POST {url}: HTTP {code} {reason}; body starts {head(answer)}"
    if body.get("continue_final_message") and code in (400, 422) and b"continue_final_message" in answer:
        return PrefillError(f"{problem}: the endpoint rejects continue_final_message, so it cannot continue a "
                            f"forced prefix; {FALLBACK_HINT}")
    if code == 404 and "prompt" in body:
        return ServedError(f"{problem}: no completions endpoint; serve with vLLM, or use mode='chat'")
    return ServedError(problem)


class ServedAgent:
    """Greedy replies of a model served behind an OpenAI-compatible endpoint, each starting with its
    transcript's forced prefix; a :class:`interp.generation.ReplySource`.

    Args:
        base_url: the server's API root, e.g. ``"http://localhost:8000/v1"``.
        model: the served model's name (vLLM's ``--served-model-name``, or a LoRA module's name).
        tokenizer: the served model's tokenizer (or its hub id / folder): it renders the prompts
            and checks what the server ran.
        mode: ``"completions"`` (token-id prompts rendered here: exact) or ``"chat"`` (vLLM's
            ``continue_final_message``).
        api_key: sent as a bearer token (vLLM's ``--api-key``); None sends none.
        timeout, max_retries, backoff: per request (see :func:`post_json`).
        batch_size: prompts per completions request; concurrent requests in chat mode.
        vllm_extensions: send vLLM's fields besides OpenAI's (``stop_token_ids``,
            ``skip_special_tokens=false``, ``return_token_ids``); chat prefill needs vLLM anyway.

    A :class:`interp.generation.Generation`'s ``completion_ids`` are the server's token ids when it
    reports them (vLLM's ``return_token_ids``), else empty; ``settled`` is always False.
    """

    hf_model = None  # the server holds the model
    stops_early = False  # a served reply is never cut by ``until``

    def __init__(self, base_url: str, model: str, tokenizer: Any, *, mode: Mode = "completions",
                 api_key: str | None = None, timeout: float = 120.0, max_retries: int = 2, backoff: float = 1.0,
                 batch_size: int = 64, seed: int = 0, vllm_extensions: bool = True):
        check_choice(mode, MODES, "serving mode")
        if max_retries < 0 or batch_size < 1 or not timeout > 0:
            raise ValueError(f"need max_retries >= 0, batch_size >= 1 and timeout > 0 (got {max_retries}, "
                             f"{batch_size}, {timeout})")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.stop_ids = sorted(stop_token_ids(self.tokenizer))
        if not self.stop_ids:
            raise ValueError("the tokenizer has no end-of-turn token (eos_token or a known one) to stop replies at")
        self.stop_strings = self.tokenizer.convert_ids_to_tokens(self.stop_ids)
        self.url = base_url.rstrip("/") + ("/completions" if mode == "completions" else "/chat/completions")
        self.model, self.mode, self.api_key, self.seed = model, mode, api_key, seed
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.batch_size, self.vllm_extensions = batch_size, vllm_extensions
        self.requests = 0
        """HTTP requests answered so far."""
        self._prefill_checked = False
        self._count_lock = threading.Lock()  # chat requests answer in several threads

    def __repr__(self) -> str:
        return f"ServedAgent({self.url!r}, model={self.model!r}, mode={self.mode!r})"

    def generate(self, transcripts: Sequence[Transcript], *, max_new_tokens: int = 64, until: Until | None = None,
                 progress: bool = False) -> list[Generation]:
        """Greedy replies to ``transcripts`` (each ends before the assistant's turn; its ``prefix``
        forced), at most ``max_new_tokens`` tokens after the prefix. ``until`` is ignored (see the
        module's docstring)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(transcripts) == 0:
            return []
        if self.mode == "completions":
            return self._completions(transcripts, max_new_tokens, progress)
        return self._chat(transcripts, max_new_tokens, progress)

    def _sampling(self, max_new_tokens: int) -> dict[str, Any]:
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": 0.0, "seed": self.seed, "n": 1,
                "stop": self.stop_strings}
        if self.vllm_extensions:
            body.update(stop_token_ids=self.stop_ids, skip_special_tokens=False, spaces_between_special_tokens=False,
                        return_token_ids=True)
        return body

    def _post(self, body: Mapping[str, Any]) -> dict:
        reply = post_json(self.url, body, api_key=self.api_key, timeout=self.timeout, retries=self.max_retries,
                          backoff=self.backoff)
        with self._count_lock:
            self.requests += 1
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise ServedError(f"POST {self.url}: reply JSON has no 'choices' list; it starts "
                              f"{head(json.dumps(reply).encode())}")
        return reply

    def _completions(self, transcripts: Sequence[Transcript], max_new_tokens: int, progress: bool) -> list[Generation]:
        prompts = [render(t, self.tokenizer, add_generation_prompt=True).input_ids.tolist() for t in transcripts]
        out: list[Generation] = []
        for s in tqdm(range(0, len(prompts), self.batch_size), desc="served replies", disable=not progress,
                      leave=False):
            batch = prompts[s:s + self.batch_size]
            reply = self._post({**self._sampling(max_new_tokens), "prompt": batch})
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
            if len(choices) != len(batch) or any(not isinstance(c, dict) or not isinstance(c.get("text"), str)
                                                 for c in choices):
                raise ServedError(f"POST {self.url}: expected {len(batch)} choices with a 'text', got "
                                  f"{head(json.dumps(reply['choices']).encode())}")
            ran = [c.get("prompt_token_ids") for c in choices]
            if all(r is not None for r in ran):
                self._check_prompt(ran == batch, sum(map(len, ran)), sum(map(len, batch)), None)
            elif isinstance(reply.get("usage"), dict) and "prompt_tokens" in reply["usage"]:
                n = sum(len(p) for p in batch)
                self._check_prompt(reply["usage"]["prompt_tokens"] == n, reply["usage"]["prompt_tokens"], n, None)
            out += [self._generation(t, c["text"], c) for t, c in zip(transcripts[s:s + self.batch_size], choices)]
        return out

    def _chat(self, transcripts: Sequence[Transcript], max_new_tokens: int, progress: bool) -> list[Generation]:
        def one(t: Transcript, want: list[int]) -> Generation:
            reply = self._post(self._chat_body(t, max_new_tokens))
            choice = reply["choices"][0] if reply["choices"] else None
            message = choice.get("message") if isinstance(choice, dict) else None
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                raise ServedError(f"POST {self.url}: reply JSON has no text at choices[0].message.content (serve "
                                  "without a tool-call or reasoning parser, so replies stay text); it starts "
                                  f"{head(json.dumps(reply).encode())}")
            ran = reply.get("prompt_token_ids")
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            if ran is not None:
                self._check_prompt(ran == want, len(ran), len(want), t)
            elif "prompt_tokens" in usage:
                self._check_prompt(usage["prompt_tokens"] == len(want), usage["prompt_tokens"], len(want), t)
            elif t.prefix:
                raise PrefillError(f"POST {self.url}: the reply reports no prompt tokens (usage.prompt_tokens), so "
                                   "whether the endpoint continued the forced prefix cannot be checked")
            return self._generation(t, text, choice)

        wants = [self._chat_prompt_ids(t) for t in transcripts]  # here: a tokenizer is not for several threads
        first = [] if self._prefill_checked else [one(transcripts[0], wants[0])]  # one request alone probes
        self._prefill_checked = True
        n = len(first)
        with ThreadPoolExecutor(max_workers=max(1, min(self.batch_size, len(transcripts) - n))) as pool:
            return first + list(tqdm(pool.map(one, transcripts[n:], wants[n:]), total=len(transcripts) - n,
                                     desc="served replies", disable=not progress, leave=False))

    def _chat_body(self, t: Transcript, max_new_tokens: int) -> dict[str, Any]:
        body = {**self._sampling(max_new_tokens), "messages": [m.to_dict(json_arguments=True) for m in t.messages]}
        if t.tools:
            body["tools"] = [dict(x) for x in t.tools]
        if t.prefix:
            body["messages"].append({"role": "assistant", "content": t.prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def _chat_prompt_ids(self, t: Transcript) -> list[int]:
        """The tokens a server that continues the final assistant message runs: the chat template
        over the messages and the prefix as that message, cut after it (as transformers does)."""
        if not t.prefix:
            return render(t, self.tokenizer, add_generation_prompt=True).input_ids.tolist()
        whole = t.with_prefix(None).with_messages(list(t.messages) + [Message("assistant", t.prefix)])
        _, text = render_real(whole, self.tokenizer, False, {"continue_final_message": True})
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_prompt(self, same: bool, ran: int, want: int, t: Transcript | None) -> None:
        """Stop on a reply to another prompt than the one rendered here (``ran`` and ``want`` tokens)."""
        if same:
            return
        what = f"{ran} prompt tokens where the prompt rendered here has {want}"
        if t is not None and t.prefix:
            raise PrefillError(f"POST {self.url}: the endpoint did not continue the forced prefix of transcript "
                               f"{t.id!r} ({what}: it ignores continue_final_message); {FALLBACK_HINT}")
        raise ServedError(f"POST {self.url}: the server ran other prompt tokens than those rendered here ({what}); "
                          "is the tokenizer here the served model's?")

    def _generation(self, t: Transcript, text: str, choice: Mapping[str, Any]) -> Generation:
        end = next((s for s in self.stop_strings if text.endswith(s)), None)  # servers that keep the stop text
        body = text[:-len(end)] if end else text
        ids = choice.get("token_ids")
        return Generation(t.id, t.prefix or "", (t.prefix or "") + body,
                          tuple(int(i) for i in ids) if isinstance(ids, list) else (),
                          choice.get("finish_reason") == "stop")


def load_remote(repo_id: str, *, revision: str | None = None, host: str | None = None, dry_run: bool = False) -> Model:
    """A hub model that runs on NDIF: its architecture is built here on the meta device (config and
    tokenizer only, no weights) and every :meth:`interp.models.Model.residual` is an nnsight trace
    sent to NDIF (``host`` overrides nnsight's ``CONFIG.API.HOST``). Forward hooks (steering,
    generation) need local weights and refuse a remote model.

    ``dry_run`` loads the weights here instead and runs each trace through nnsight's local
    simulation of the remote path (serialized, local modules hidden, deserialized, run): a check
    of a pipeline on a small model before it spends NDIF time.

    Raises:
        ValueError: no NDIF API key is configured (``NDIF_API_KEY`` before nnsight is imported,
            or ``nnsight.login()``), unless ``dry_run``.
    """
    # deferred: nnsight is heavy, and only the remote path needs it
    from nnsight import CONFIG, TransformersModel

    if not dry_run and not CONFIG.API.APIKEY:
        raise ValueError("no NDIF API key configured: set NDIF_API_KEY before nnsight is imported, or run "
                         "nnsight.login() once (it stores the key in nnsight's config)")
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
    if tokenizer.pad_token_id is None:  # padding is done by hand; any id works under the mask
        tokenizer.pad_token = tokenizer.eos_token
    native = TransformersModel(repo_id, task="text-generation", revision=revision, tokenizer=tokenizer,
                               dispatch=dry_run)
    hf_model = native.pipeline.model
    return Model(repo_id, "nnsight", hf_model, tokenizer, native, find_layers(hf_model),
                 remote="local" if dry_run else host or True)
