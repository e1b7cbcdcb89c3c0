"""The nnsight backend's remote path (NDIF, interp.served.load_remote), as far as it runs without
the network: the model is built here without weights, Model.residual sends its trace with
``remote=``, the request names the model and carries the API key, and what a server sends back
(the variables the block saved, nothing else) is what the caller gets: activations equal to the
plain forward's. nnsight's own local simulation of the remote path agrees too."""

from __future__ import annotations

import linecache
import socket
from types import SimpleNamespace

import numpy as np
import pytest
from nnsight import CONFIG, TransformersModel
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.modeling import huggingface
from nnsight.schema.request import RequestModel

from interp.cache import cache_activations
from interp.models import load_model
from interp.served import load_remote
from tests.conftest import agent_transcript, assert_within_row_norm

POSITIONS = "every:prefix+decision"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any network connection fails the test."""
    def refuse(self, address):
        raise AssertionError(f"the test tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def ndif(monkeypatch, tiny_dirs):
    """A stand-in for NDIF behind nnsight's network layer (``RemoteBackend.request``): it decodes
    the request as the server does, runs it on a copy of the model that has weights, and sends back
    the variables the block saved (a server returns nothing else)."""
    path = tiny_dirs["llama"]
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    monkeypatch.setitem(huggingface._ID_CACHE, str(path), "tiny/llama")  # the hub lookup of the canonical id
    weights = load_model(path)
    server = TransformersModel(weights.hf_model, task="text-generation", tokenizer=weights.tokenizer)
    seen = []

    def request(self, request, tracer):
        blob = self._serialize(tracer)
        seen.append({"model_key": request.model_key, "api_key": self.api_key, "host": self.host})
        lines = dict(linecache.cache)  # the server is another process: decoding here must not touch ours
        try:
            restored = RequestModel.deserialize(blob, server._remoteable_persistent_objects(), compress=self.compress)
        finally:
            linecache.cache.clear()
            linecache.cache.update(lines)
        before = set(restored.info.frame.f_locals)
        restored.execute(restored.info.code)
        return {k: v for k, v in restored.info.frame.f_locals.items() if k not in before}

    monkeypatch.setattr(RemoteBackend, "request", request)
    return SimpleNamespace(path=str(path), weights=weights, seen=seen)


def _same_rows(a, b) -> bool:
    return a.rows.keys() == b.rows.keys() and all(np.array_equal(a.rows[k], b.rows[k]) for k in a.rows)


def _transcripts():
    return [agent_transcript(i, prefix="As a careful agent, I") for i in range(3)]


def test_without_an_api_key_loading_a_remote_model_is_a_clear_error(tiny_dirs, monkeypatch):
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(ValueError, match="no NDIF API key configured: set NDIF_API_KEY .* nnsight.login()"):
        load_remote(str(tiny_dirs["llama"]))


def test_remote_traces_send_the_model_key_and_api_key_and_return_the_saved_activations(ndif):
    model = load_remote(ndif.path)
    assert model.remote is True and model.hf_model.device.type == "meta"
    got = cache_activations(model, _transcripts(), layers=[0, 2], positions=POSITIONS, batch_size=2, progress=False)
    want = cache_activations(ndif.weights, _transcripts(), layers=[0, 2], positions=POSITIONS, batch_size=2,
                             progress=False)
    assert _same_rows(got, want)
    assert_within_row_norm(got.acts, want.acts)
    assert ndif.seen == [{"model_key": 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "tiny/llama", '
                                       '"revision": null, "task": "text-generation"}',
                          "api_key": "test-key", "host": CONFIG.API.HOST}] * 2  # one request per batch
    assert not model.native.dispatched  # no weights were loaded here


def test_a_host_given_overrides_nnsights_configured_one(ndif):
    model = load_remote(ndif.path, host="https://ndif.example")
    model.residual(*_ids(model), [1], "resid_mid")
    assert model.remote == "https://ndif.example" and ndif.seen[0]["host"] == "https://ndif.example"


def _ids(model):
    r = model.tokenizer("Open the page", return_tensors="pt")
    return r["input_ids"], r["attention_mask"]


def test_forward_hooks_refuse_a_remote_model(ndif):
    model = load_remote(ndif.path)
    with pytest.raises(ValueError, match="runs on NDIF: forward hooks need local weights"), \
            model.hooks({0: lambda x: None}):
        pass


def test_a_dry_run_through_nnsights_local_simulation_gives_the_plain_forwards_activations(tiny_dirs, monkeypatch):
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)  # a dry run needs no key
    model = load_remote(str(tiny_dirs["llama"]), dry_run=True)
    assert model.remote == "local"
    got = cache_activations(model, _transcripts(), layers="all", site="resid_pre", positions=POSITIONS,
                            progress=False)
    want = cache_activations(load_model(tiny_dirs["llama"]), _transcripts(), layers="all", site="resid_pre",
                             positions=POSITIONS, progress=False)
    assert _same_rows(got, want)
    assert_within_row_norm(got.acts, want.acts)
