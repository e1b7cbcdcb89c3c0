import inspect

import pytest
import torch
from conftest import ARCHS

from interp.models import SITES, Source, hook_name, load_model, resolve


@pytest.mark.parametrize("backend", ["hf", "bridge", "nnsight"])
def test_local_checkpoint_loads_on_every_backend(tiny_dirs, backend):
    m = load_model(tiny_dirs["qwen2"], backend=backend)
    assert (m.backend, m.n_layers, m.d_model) == (backend, 3, 64)
    assert m.tokenizer.chat_template and m.device.type == "cpu"
    ids = torch.tensor([[1, 2, 3, 4]])
    out = m.residual(ids, torch.ones_like(ids), layers=[0, 2], site="resid_pre")
    assert sorted(out) == [0, 2] and out[2].shape == (1, 4, 64)


def test_bridge_backend_exposes_transformer_lens_hook_names(tiny_dirs):
    m = load_model(tiny_dirs["llama"], backend="bridge")
    for site in SITES:
        assert hook_name(1, site) in m.native.hook_dict


def test_residual_stops_after_the_highest_requested_layer(tiny_dirs):
    m = load_model(tiny_dirs["gpt2"], backend="hf")
    ran = []
    for i, block in enumerate(m.layers):
        block.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
    ids = torch.tensor([[1, 2, 3]])
    m.residual(ids, torch.ones_like(ids), layers=[1])
    assert ran == [0, 1]


def test_dtype_is_honoured(tiny_dirs):
    m = load_model(tiny_dirs["llama"], dtype=torch.bfloat16)
    assert next(m.hf_model.parameters()).dtype == torch.bfloat16


def test_remote_code_is_off_unless_asked():
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_unknown_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at './no/such/model'"):
        load_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_hub_ids_go_to_the_hub_and_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("meta-llama/Llama-3.1-8B-Instruct") == Source("meta-llama/Llama-3.1-8B-Instruct", False)
    with pytest.raises(OSError, match="could not load 'someone/not-cached-model' from the Hugging Face Hub"):
        load_model("someone/not-cached-model")


def test_unknown_backend_is_named(tiny_dirs):
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        load_model(tiny_dirs["llama"], backend="jax")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_a_plain_forward(tiny_dirs, arch):
    m = load_model(tiny_dirs[arch])
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    alone = m.logits(ids[1:, 2:], mask[1:, 2:])
    torch.testing.assert_close(m.logits(ids, mask)[1, 2:], alone[0], atol=1e-5, rtol=0)


def test_a_peft_adapter_folder_loads_by_path_over_the_base_it_names(tiny_dirs, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    torch.manual_seed(0)
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    assert resolve(tmp_path / "adapter") == Source(str(tiny_dirs["llama"]), True, tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager")
    unmerged = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        got = load_model(tmp_path / "adapter").hf_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])(input_ids=ids).logits)
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace(str(tiny_dirs["llama"]), ""))
    with pytest.raises(ValueError, match="base_model_name_or_path .* names no base model"):
        resolve(tmp_path / "adapter")
