"""Load any Hugging Face causal LM behind one handle, on one of three backends.

- ``"hf"``: plain ``transformers`` with PyTorch forward hooks (the fastest; no extra layer);
- ``"bridge"``: TransformerLens 4 ``TransformerBridge`` (hook names ``blocks.{i}.hook_resid_*``);
- ``"nnsight"``: nnsight 0.8 ``NNsight`` over the same model (and the route to NDIF).

Whatever the backend, :meth:`Model.residual` reads the residual stream at ``resid_pre``,
``resid_mid`` or ``resid_post`` of chosen layers, stops after the highest one, and can reduce
each layer's ``[batch, pos, d_model]`` to the rows you keep inside the hook, so memory grows with
what is kept rather than with sequence length.

>>> SITES
('resid_pre', 'resid_mid', 'resid_post')
>>> hook_name(3, "resid_post")
'blocks.3.hook_resid_post'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SITES = ("resid_pre", "resid_mid", "resid_post")
BACKENDS = ("hf", "bridge", "nnsight")

# Where decoder layers live, and which module inside a layer reads the residual stream after
# attention (its input is resid_mid). Checked in order; the first present wins.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_MID_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Reduces one layer's ``[batch, pos, d_model]`` activations to what is kept, e.g. ``[rows, d_model]``."""


def hook_name(layer: int, site: str) -> str:
    """The TransformerLens name of a residual-stream site, used in results and stored metadata."""
    return f"blocks.{layer}.hook_{site}"


class _Stop(Exception):
    """Raised from a hook once the highest requested layer has been read."""


def _attr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _find_layers(hf_model: nn.Module) -> str:
    for path in _LAYER_PATHS:
        try:
            mod = _attr_path(hf_model, path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path
    n = getattr(hf_model.config, "num_hidden_layers", None)
    for name, mod in hf_model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name:
            return name
    raise ValueError(f"cannot find the decoder layers of {type(hf_model).__name__}")


def _mid_norm_name(layer: nn.Module) -> str | None:
    return next((n for n in _MID_NORMS if hasattr(layer, n)), None)


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of real tokens counted from 0 whatever the padding side: ``[batch, pos]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(eq=False)
class Model:
    """A loaded causal LM. ``hf_model`` is the ``transformers`` model every backend runs;
    ``native`` is the backend's own object (the model, a ``TransformerBridge``, or ``NNsight``)."""

    name: str
    backend: str
    hf_model: nn.Module
    tokenizer: Any
    native: Any
    layers_path: str = field(repr=False, default="model.layers")

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def n_ctx(self) -> int | None:
        cfg = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers of the underlying ``transformers`` model."""
        return _attr_path(self.hf_model, self.layers_path)

    def check_layers(self, layers: Sequence[int], site: str) -> list[int]:
        """Validate layer indices (negative ones count from the end) and the site."""
        if site not in SITES:
            raise ValueError(f"unknown site {site!r} (expected one of {', '.join(SITES)})")
        if len(layers) == 0:
            raise ValueError("no layers requested")
        out = []
        for layer in layers:
            if not isinstance(layer, (int,)) or isinstance(layer, bool):
                raise ValueError(f"layer {layer!r} is not an integer")
            i = layer + self.n_layers if layer < 0 else layer
            if not 0 <= i < self.n_layers:
                raise ValueError(f"layer {layer} is out of range: {self.name} has {self.n_layers} layers (0..{self.n_layers - 1})")
            out.append(i)
        if site == "resid_mid" and self.backend != "bridge" and _mid_norm_name(self.layers[0]) is None:
            raise ValueError(f"resid_mid is not located for {type(self.layers[0]).__name__} on backend "
                             f"{self.backend!r} (no second norm module); use backend='bridge'")
        return out

    @torch.no_grad()
    def residual(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int],
        site: str = "resid_post",
        gather: Gather | None = None,
    ) -> dict[int, torch.Tensor]:
        """Read the residual stream at ``site`` of each of ``layers``.

        Args:
            input_ids: ``[batch, pos]`` token ids (any padding side).
            attention_mask: ``[batch, pos]``, 1 for real tokens; positions are derived from it.
            layers: layer indices; the forward pass stops after the highest.
            site: ``resid_pre`` (block input), ``resid_mid`` (after attention) or ``resid_post``.
            gather: applied to each layer's ``[batch, pos, d_model]`` inside the hook.

        Returns:
            ``{layer: gather(activations)}``, by default ``[batch, pos, d_model]`` per layer.
        """
        layers = sorted(set(self.check_layers(layers, site)))
        gather = gather or (lambda x: x)
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        position_ids = position_ids_from_mask(attention_mask)
        reader = {"hf": _read_hf, "bridge": _read_bridge, "nnsight": _read_nnsight}[self.backend]
        return reader(self, input_ids, attention_mask, position_ids, layers, site, gather)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, d_vocab]`` logits of a plain forward (padding-correct positions)."""
        dev = self.device
        attention_mask = attention_mask.to(dev)
        return self.hf_model(input_ids=input_ids.to(dev), attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask)).logits


def _read_hf(m: Model, ids, mask, pos, layers, site, gather) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    last = layers[-1]
    handles = []

    def keep(i: int, x: torch.Tensor) -> None:
        out[i] = gather(x)
        if i == last:
            raise _Stop

    for i in layers:
        layer = m.layers[i]
        if site == "resid_pre":
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: keep(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        elif site == "resid_mid":
            norm = getattr(layer, _mid_norm_name(layer))
            handles.append(norm.register_forward_pre_hook(lambda mod, args, i=i: keep(i, args[0])))
        else:
            handles.append(layer.register_forward_hook(lambda mod, args, output, i=i: keep(i, _first_tensor(output))))
    try:
        m.hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def _read_bridge(m: Model, ids, mask, pos, layers, site, gather) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(x, hook):
            out[i] = gather(x)
            return x
        return hook

    stop = layers[-1] + 1
    m.native.run_with_hooks(ids, attention_mask=mask, position_ids=pos,
                            fwd_hooks=[(hook_name(i, site), hook_for(i)) for i in layers],
                            return_type=None, stop_at_layer=stop if stop < m.n_layers else None)
    return out


def _read_nnsight(m: Model, ids, mask, pos, layers, site, gather) -> dict[int, torch.Tensor]:
    saved = {}
    envoys = _attr_path(m.native, m.layers_path)
    mid = _mid_norm_name(m.layers[0])
    with m.native.trace(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False) as tracer:
        for i in layers:  # nnsight needs values requested in execution order
            env = envoys[i]
            if site == "resid_pre":
                x = env.input
            elif site == "resid_mid":
                x = getattr(env, mid).input
            else:
                x = _first_tensor(env.output)
            saved[i] = gather(x).save()
        tracer.stop()
    return {i: v for i, v in saved.items()}


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Builtin:
    """A model that ships with the toolkit (or is built by its set-up), loadable by ``name``.

    ``checkpoint()`` returns the folder of a ``save_pretrained`` checkpoint; ``adapter()``, when
    given, a PEFT adapter folder applied on top of it (and merged, so every backend sees one
    plain model). Both raise ``FileNotFoundError`` with the command that rebuilds a missing or
    corrupt file."""

    name: str
    checkpoint: Callable[[], Path]
    adapter: Callable[[], Path] | None = None
    description: str = ""


_BUILTINS: dict[str, Builtin] = {}


def register_builtin(builtin: Builtin) -> None:
    """Make ``builtin.name`` loadable with :func:`load_model`. The built-in models register
    themselves when :mod:`interp` is imported; this module names none of them."""
    _BUILTINS[builtin.name] = builtin


def builtin_names() -> tuple[str, ...]:
    """Names of the registered built-in models."""
    return tuple(_BUILTINS)


@dataclass(frozen=True)
class Source:
    """Where :func:`load_model` finds a model: ``path`` (a local folder or a hub id), whether it
    is ``local``, and an optional PEFT ``adapter`` folder to merge into it."""

    path: str
    local: bool
    adapter: Path | None = None


def resolve(name_or_path: str | Path) -> Source:
    """Map a model name to a :class:`Source`: a registered built-in name (see
    :func:`builtin_names`), an existing ``save_pretrained`` directory, or an ``owner/name`` hub id."""
    name = str(name_or_path)
    if name in _BUILTINS:
        b = _BUILTINS[name]
        return Source(str(b.checkpoint()), True, None if b.adapter is None else b.adapter())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: no config.json, not a saved Hugging Face model directory")
        return Source(str(p), True)
    if p.exists():
        raise FileNotFoundError(f"{p}: is a file; pass the model directory (the one with config.json)")
    if re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) and not name.startswith((".", "~")):
        return Source(name, False)
    raise FileNotFoundError(f"no model at {name!r}: not a directory, not a hub id, not a built-in model "
                            f"({', '.join(_BUILTINS) or 'none registered'})")


def _merge_adapter(hf_model: nn.Module, adapter: Path) -> nn.Module:
    """The model with a PEFT adapter folder merged into its weights: a plain ``transformers``
    model again, so every backend runs it unchanged."""
    from peft import PeftModel  # optional dependency: only built-ins with adapters need it

    return PeftModel.from_pretrained(hf_model, str(adapter)).merge_and_unload()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str | Path,
    backend: str = "hf",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = "eager",
    tokenizer: Any = None,
) -> Model:
    """Load a Hugging Face causal LM by hub id or local path (or ``"organism"``) into a backend.

    Args:
        name_or_path: hub id (``"meta-llama/Llama-3.1-8B-Instruct"``), a local directory saved
            with ``save_pretrained``, or ``"organism"`` / ``"organism-finetuned"``.
        backend: ``"hf"``, ``"bridge"`` (TransformerLens 4) or ``"nnsight"``.
        device: where to put the model (default: CUDA if available, else CPU). Ignored when
            ``device_map`` is given (multi-device placement through ``accelerate``).
        dtype: parameter dtype (float32 by default; bfloat16 / float16 allowed).
        trust_remote_code: off unless you ask for it.
        attn_implementation: ``"eager"`` by default so all backends (the bridge forces eager)
            compute exactly the same thing; pass ``"sdpa"`` for speed on ``"hf"``/``"nnsight"``.
        tokenizer: a tokenizer to use instead of the one saved with the model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name_or_path)
    path, local = source.path, source.local
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        where = "local directory" if local else "Hugging Face Hub (is the network reachable? HF_HUB_OFFLINE?)"
        raise OSError(f"could not load {name_or_path!r} from the {where}: {e}") from e
    if source.adapter is not None:
        hf_model = _merge_adapter(hf_model, source.adapter)
    if device_map is None:
        hf_model.to(device or _default_device())
    hf_model.eval()
    if tok.pad_token_id is None:  # padding is done by hand; any id works under the mask
        tok.pad_token = tok.eos_token
    layers_path = _find_layers(hf_model)
    native: Any = hf_model
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        boot_kwargs: dict[str, Any] = dict(hf_model=hf_model, tokenizer=tok, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
        if device_map is None:
            boot_kwargs["device"] = str(hf_model.device)
        native = TransformerBridge.boot_transformers(path, **boot_kwargs)
        native.eval()
    elif backend == "nnsight":
        from nnsight import NNsight

        native = NNsight(hf_model)
    return Model(name=str(name_or_path), backend=backend, hf_model=hf_model, tokenizer=tok, native=native,
                 layers_path=layers_path)
