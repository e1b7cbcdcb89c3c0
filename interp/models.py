"""Load any Hugging Face causal LM behind one handle, on one of three backends, and hook it.

- ``"hf"``: plain ``transformers`` with PyTorch forward hooks (the fastest; no extra layer);
- ``"bridge"``: TransformerLens 4 ``TransformerBridge`` (hook points ``blocks.{i}.hook_resid_*``);
- ``"nnsight"``: nnsight 0.8 ``NNsight`` over the same model (and the route to NDIF).

:meth:`Model.hooks` is the one place where the toolkit attaches anything to a model's residual
stream: a context manager that calls a function on ``resid_pre``, ``resid_mid`` or
``resid_post`` of chosen layers during every forward inside the block (generation included),
lets the function replace the activations, and can stop the forward after a layer. Caching,
steering, attribution and the PING screen all go through it. :meth:`Model.residual` reads the
stream (through :meth:`Model.hooks` on ``hf`` and ``bridge``, through an nnsight trace on
``nnsight``, which is what remote execution needs) and can reduce each layer's
``[batch, pos, d_model]`` to the rows kept inside the hook, so memory grows with what is kept.

>>> SITES
('resid_pre', 'resid_mid', 'resid_post')
>>> hook_name(3, "resid_post")
'blocks.3.hook_resid_post'
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

Site = Literal["resid_pre", "resid_mid", "resid_post"]
Backend = Literal["hf", "bridge", "nnsight"]
SITES: tuple[str, ...] = get_args(Site)
BACKENDS: tuple[str, ...] = get_args(Backend)

# Where decoder layers live, and which module inside a layer reads the residual stream after
# attention (its input is resid_mid). Checked in order; the first present wins.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_MID_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                "transformer.norm")

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Reduces one layer's ``[batch, pos, d_model]`` activations to what is kept, e.g. ``[rows, d_model]``."""

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called with the residual stream ``[batch, pos, d_model]`` at one site of one layer; returns a
tensor of the same shape to replace it, or None to leave it as it is."""


def hook_name(layer: int, site: str) -> str:
    """The TransformerLens name of a residual-stream site, used in results and stored metadata."""
    return f"blocks.{layer}.hook_{site}"


def check_choice(value: Any, options: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``options``, else a ValueError naming ``what`` and the options."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {what} {value!r} (expected one of {', '.join(options)})")
    return value


class _Stop(Exception):
    """Raised from a hook once the requested layer has run; carries the context that raised it."""

    def __init__(self, owner: object):
        super().__init__("stopped after the requested layer")
        self.owner = owner


def _try_path(root: Any, path: str) -> Any:
    try:
        return _attr_path(root, path)
    except AttributeError:
        return None


def _attr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def find_layers(hf_model: nn.Module) -> str:
    """Where the decoder layers of ``hf_model`` live (``"model.layers"``, ...)."""
    for path in _LAYER_PATHS:
        if isinstance(_try_path(hf_model, path), nn.ModuleList):
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


def _as_layer_index(layer: Any) -> int:
    if isinstance(layer, bool):
        raise ValueError(f"layer {layer!r} is not an integer")
    try:
        return operator.index(layer)  # int, numpy and torch integers
    except TypeError:
        raise ValueError(f"layer {layer!r} is not an integer") from None


@dataclass(eq=False)
class Model:
    """A loaded causal LM. ``hf_model`` is the ``transformers`` model every backend runs;
    ``native`` is the backend's own object (the model, a ``TransformerBridge``, or ``NNsight``)."""

    name: str
    backend: Backend
    hf_model: nn.Module
    tokenizer: Any
    native: Any
    layers_path: str = field(repr=False, default="model.layers")
    remote: bool | str = False  # nnsight traces on NDIF (True, or a host URL); see interp.served.load_remote

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def n_ctx(self) -> int | None:
        keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
        return next((int(getattr(self.hf_model.config, k)) for k in keys if getattr(self.hf_model.config, k, None)), None)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers of the underlying ``transformers`` model."""
        return _attr_path(self.hf_model, self.layers_path)

    def check_layers(self, layers: Sequence[int], site: Site) -> list[int]:
        """Validate layer indices (negative ones count from the end; any integer type) and the site."""
        check_choice(site, SITES, "site")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) and not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be a list of integers, got {layers!r}")
        layers = list(layers)
        if len(layers) == 0:
            raise ValueError("no layers requested")
        out = []
        for layer in layers:
            index = _as_layer_index(layer)
            i = index + self.n_layers if index < 0 else index
            if not 0 <= i < self.n_layers:
                raise ValueError(f"layer {index} is out of range: {self.name} has {self.n_layers} layers (0..{self.n_layers - 1})")
            out.append(i)
        if site == "resid_mid" and self.backend != "bridge" and _mid_norm_name(self.layers[0]) is None:
            raise ValueError(f"resid_mid is not located for {type(self.layers[0]).__name__} on backend "
                             f"{self.backend!r} (no second norm module); use backend='bridge'")
        return out

    # -- the one hook site ---------------------------------------------------------------------

    @contextmanager
    def hooks(self, fns: Mapping[int, HookFn], site: Site = "resid_post", *,
              stop_after: int | None = None) -> Iterator[None]:
        """Call ``fns[layer]`` on the residual stream at ``site`` of each layer during every forward
        inside the block; a function may return a replacement ``[batch, pos, d_model]``.

        ``stop_after`` ends a forward once that layer's ``site`` has run (the forward returns
        nothing; the block goes on). Hooks stack: an inner block's functions see what outer ones
        wrote, and hooks at one site run in the order they were entered. On ``hf`` and ``nnsight``
        the hooks are PyTorch hooks on the ``transformers`` modules (``resid_mid`` is the input of
        the block's second norm: a replacement there changes what the MLP reads, not the residual
        carried past it); on ``bridge`` they are the bridge's own hook points
        ``blocks.{i}.hook_resid_*`` (a ``resid_mid`` replacement changes the residual itself)::

            with model.hooks({3: lambda x: x + shift}, "resid_pre"):
                model.hf_model(...)                       # layer 3 reads the shifted stream
        """
        layers = self.check_layers(list(fns), site)
        if stop_after is not None:
            stop_after = self.check_layers([stop_after], site)[0]
        calls = {i: fns[k] for i, k in zip(layers, fns)}
        owner = object()

        def call(i: int, x: torch.Tensor) -> torch.Tensor | None:
            y = calls[i](x)
            if i == stop_after:
                raise _Stop(owner)
            return y

        with ExitStack() as stack:
            for i in calls:
                stack.callback(self._attach(i, site, lambda x, i=i: call(i, x)))
            if stop_after is not None and stop_after not in calls:
                stack.callback(self._attach(stop_after, site, lambda x: call(stop_after, x)))
                calls[stop_after] = lambda x: None
            try:
                yield
            except _Stop as e:
                if e.owner is not owner:
                    raise

    def _attach(self, i: int, site: Site, fn: HookFn) -> Callable[[], None]:
        """Attach ``fn`` at ``site`` of layer ``i``; returns the function that detaches it."""
        if self.remote:
            raise ValueError(f"{self.name} runs on NDIF: forward hooks need local weights (read with residual())")
        if self.backend == "bridge":
            point = _attr_path(self.native, hook_name(i, site))
            handle = point.add_hook(lambda x, hook: fn(x))

            def detach() -> None:
                handle.hook.remove()
                point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
            return detach
        layer = self.layers[i]
        if site == "resid_pre":
            def pre(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                y = fn(x)
                if y is None:
                    return None
                return ((y, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=y))
            return layer.register_forward_pre_hook(pre, with_kwargs=True).remove
        if site == "resid_mid":
            def mid(mod, args):
                y = fn(args[0])
                return None if y is None else (y, *args[1:])
            return getattr(layer, _mid_norm_name(layer)).register_forward_pre_hook(mid).remove

        def post(mod, args, output):
            y = fn(_first_tensor(output))
            if y is None:
                return None
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return layer.register_forward_hook(post).remove

    # -- forwards --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        """One forward of the backend's model with positions derived from the mask (any padding
        side); ``hf``/``nnsight`` return the ``transformers`` output, ``bridge`` the bridge's."""
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        position_ids = position_ids_from_mask(attention_mask)
        if self.backend == "bridge":
            return self.native(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               return_type=kwargs.pop("return_type", "logits"), **kwargs)
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **{"use_cache": False, **kwargs})

    @torch.no_grad()
    def residual(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int],
        site: Site = "resid_post",
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
        if self.backend == "nnsight":
            return self._trace_residual(input_ids, attention_mask, layers, site, gather)
        out: dict[int, torch.Tensor] = {}

        def keep(i: int) -> HookFn:
            def fn(x: torch.Tensor) -> None:
                out[i] = gather(x)
            return fn

        with self.hooks({i: keep(i) for i in layers}, site, stop_after=layers[-1]):
            self.forward(input_ids, attention_mask, **({"return_type": None} if self.backend == "bridge" else {}))
        return out

    def _trace_residual(self, ids, mask, layers, site, gather) -> dict[int, torch.Tensor]:
        """nnsight's own reading: saved values inside a trace, which runs on NDIF when ``remote``."""
        if self.device.type != "meta":  # a remote model's weights are not here: the server places the inputs
            ids, mask = ids.to(self.device), mask.to(self.device)
        envoys = _attr_path(self.native, self.layers_path)
        mid = _mid_norm_name(self.layers[0])
        with self.native.trace(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               use_cache=False, **({"remote": self.remote} if self.remote else {})) as tracer:
            saved = {}
            for i in layers:  # nnsight needs values requested in execution order
                env = envoys[i]
                x = env.input if site == "resid_pre" else getattr(env, mid).input if site == "resid_mid" \
                    else _first_tensor(env.output)
                saved[i] = gather(x)
            saved = saved.save()  # the dict itself: a remote server sends back saved variables only
            tracer.stop()
        return dict(saved)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, d_vocab]`` logits of a plain ``transformers`` forward (padding-correct positions)."""
        dev = self.device
        attention_mask = attention_mask.to(dev)
        return self.hf_model(input_ids=input_ids.to(dev), attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask)).logits

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: the final norm, the output embedding and any
        logit soft-capping, on ``[..., d_model]`` → ``[..., d_vocab]`` (so a caller can unembed
        only the rows it needs)."""
        norm = next((m for m in (_try_path(self.hf_model, p) for p in _FINAL_NORMS) if m is not None), None)
        if norm is None:
            raise ValueError(f"cannot find the final norm of {type(self.hf_model).__name__}")
        logits = self.hf_model.get_output_embeddings()(norm(x))
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


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
    :func:`builtin_names`), an existing ``save_pretrained`` directory, a PEFT adapter directory
    (``adapter_config.json``; its ``base_model_name_or_path`` is resolved the same way), or an
    ``owner/name`` hub id."""
    name = str(name_or_path)
    if name in _BUILTINS:
        b = _BUILTINS[name]
        return Source(str(b.checkpoint()), True, None if b.adapter is None else b.adapter())
    p = Path(name).expanduser()
    if p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        source = resolve(base) if base else None
        if source is None or source.adapter is not None:
            raise ValueError(f"{p / 'adapter_config.json'}: base_model_name_or_path {base!r} names no base model "
                             "to merge the adapter into")
        return Source(source.path, source.local, p)
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


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle-only weights (``pytorch_model.bin``, ``*.pt``: they can run code) unless ``allow_pickle``."""
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl") for p in folder.glob(pattern))
    if pickles and not allow_pickle and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: the weights are pickle files ({', '.join(pickles[:3])}), which can run code when "
                         "loaded; convert them to safetensors, or pass allow_pickle=True (--allow-pickle-weights)")


def load_model(
    name_or_path: str | Path,
    backend: Backend = "hf",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = "eager",
    tokenizer: Any = None,
    allow_pickle: bool = False,
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
        allow_pickle: load weights saved as pickle files (``pytorch_model.bin``); by default
            only safetensors weights load, and a pickle-only folder raises ``ValueError``.
    """
    check_choice(backend, BACKENDS, "backend")
    source = resolve(name_or_path)
    path, local = source.path, source.local
    for folder in ([Path(path)] if local else []) + ([source.adapter] if source.adapter else []):
        check_weights(folder, allow_pickle)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                                  use_safetensors=None if allow_pickle else True)
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
        from peft import PeftModel  # only adapters need it; merged, every backend runs a plain model

        hf_model = PeftModel.from_pretrained(hf_model, str(source.adapter)).merge_and_unload()
    if device_map is None:
        hf_model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf_model.eval()
    if tok.pad_token_id is None:  # padding is done by hand; any id works under the mask
        tok.pad_token = tok.eos_token
    layers_path = find_layers(hf_model)
    native: Any = hf_model
    if backend == "bridge":
        from transformer_lens.model_bridge import TransformerBridge  # heavy, and only this backend needs it

        boot_kwargs: dict[str, Any] = dict(hf_model=hf_model, tokenizer=tok, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
        if device_map is None:
            boot_kwargs["device"] = str(hf_model.device)
        native = TransformerBridge.boot_transformers(path, **boot_kwargs)
        native.eval()
    elif backend == "nnsight":
        from nnsight import NNsight  # heavy, and only this backend needs it

        native = NNsight(hf_model)
    return Model(name=str(name_or_path), backend=backend, hf_model=hf_model, tokenizer=tok, native=native,
                 layers_path=layers_path)
