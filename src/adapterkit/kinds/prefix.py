"""Prefix tuning, Li & Liang 2021 (arXiv 2101.00190): P learned key and value vectors per layer that
every real token attends to, as if P virtual tokens came before the input.

Parameters per layer: ``key`` and ``value``, each (P, kv_dim), kv_dim = kv_heads * head_dim (the
value projection's output: GPT-2's part of ``c_attn``, grouped-query attention's narrower ``v_proj``).
They are the attention's keys and values themselves (after RoPE: they carry no position).

Where, with hooks only (no copied model code):

- **Decoders** (``DECODERS``: the Llama, GPT-2, GPT-NeoX, Bloom, OPT, ... families and mixtures of
  experts): one forward pre-hook on the decoder stack (the module holding the layers: ``model.model``,
  ``model.transformer``, OPT's ``model.decoder``) rewrites its keyword inputs. When the incoming KV
  cache is empty (no cache, or the first step of ``generate``), it fills a ``DynamicCache`` with each
  row's prefix, (B, kv_heads, P_max, head_dim) per layer, zero-padded after a shorter prefix; on every
  call it prepends a (B, P_max) block to the attention mask (1 on a row's own prefix, 0 on padding and
  on rows without one) and keeps the position ids the tokens would have without the prefix. transformers
  4.57's ``cache_position`` (an index into the cache) is shifted by P_max; 5.x has none. The cache keeps
  the prefix as ordinary entries (``prefix_state``), which the server's continuous decoding re-packs
  (``mark_packed``). Sliding / local attention layers (Mistral, Gemma 2 / 3, GPT-Neo) count the prefix as the cache's first positions:
  a call whose prefix and tokens exceed the window is refused (past it a token would not see the prefix,
  and a batch's padding would move it out sooner than for the row alone).
- **Encoders** (the BERT family) **and encoder-decoders** (T5, BART families): their stacks take no
  cache to fill, but every self-attention module takes a cache argument (the class serves decoders
  too) and its mask. One forward pre-hook per layer on the self-attention module (the parent of the
  value projection) hands it a one-layer cache view (``_PrefixedCache``) whose ``update`` returns the
  rows' prefix before the keys and values the module just computed (and, in a decoder, before what
  the real cache holds, which never sees the prefix: ``generate``, beams and cache reordering are
  untouched), and widens the 4-D mask by P_max columns: each row's prefix sits left-padded (its P
  columns last), 0 / -inf (or True / False) as the incoming mask's form, a causal mask built where the
  model passed none (sdpa without padding). The model never sees a cache: real tokens keep every
  position they have without a prefix. T5's relative position bias is computed for the P_max + T keys
  with the queries shifted by P_max (5.x: the view reports P_max more cached tokens; 4.57: the module's
  ``cache_position`` is shifted): a row's prefix column p (0..P-1) is at relative distance p - P - i from
  query i, P virtual tokens right before the input (left padding makes this the same for a row alone
  and in a mixed batch). Per the paper (BART: prefixes on the encoder's and the decoder's input) the
  prefix acts in the encoder's and the decoder's self-attention, one per layer (decoder layers numbered
  after the encoder's); cross-attention is left alone: its keys and values are the encoder's outputs,
  which the encoder prefix already steers, and the site table has no cross-attention role to size a
  third set by (PEFT prefixes the decoder's self- and cross-attention and not the encoder; the
  authors' BART code had all three: neither's checkpoints map onto this).

A mixed batch gathers each row's padded prefix from the model's stacks (``Route.gather``), so rows of
other kinds (LoRA, bottlenecks: their own hooks) and rows without an adapter share the batch.

**Reparameterisation** (``prefix_projection``, the paper's section 4.3; PEFT's ``prefix_projection``):
while training, each layer's (key, value) is ``up_i(tanh(down(E)))``: E (P, d) an embedding, ``down``
Linear(d, h) shared by every layer (held by the first layer's module), ``up_i`` Linear(h, 2 kv_dim) per
layer (one Linear to every layer's keys and values, split by layer). The artifact holds the folded
plain prefixes (``export``: ``save_adapter``), and loads as a plain prefix adapter; its metadata's
``trained_with`` records the MLP. Training checkpoints keep the MLP (``save_adapter(resumable=True)``).
Loading plain prefixes into an adapter still in its MLP form folds it first (``fold``): that is how a
run's best artifact comes back into the model after training.

Refused, with the reason: architectures other than those above (``REFUSED`` says why for the ones
adapterkit otherwise supports), ``leave_out`` and AdapterDrop (one attention mask serves every layer;
T5 shares one position bias across its layers), compositions, a 4-D mask on decoders, flash / flex
attention on encoders (their masks are not 4-D tensors), and on decoders: gradient checkpointing in
training (transformers drops the KV cache in checkpointed layers), a non-empty cache that did not
start with this prefix (unless ``mark_packed``), a prefix and tokens longer than a sliding window.

Config: the prefix length P is ``bottleneck_size`` (default 10); ``init_std`` the std of the plain
prefixes' normal init. Shapes: B rows, T new tokens, P_max the longest prefix in the batch, L / S
cached tokens, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..stacks import bump_epoch
from .interface import AdapterKind, SiteModule

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route

DEFAULT_LENGTH = 10
DEFAULT_HIDDEN = 512  # the reparameterisation MLP's width (the paper's code; the adapters library)
# model_type rows the prefix is tested on (tests/core/test_prefix.py, test_prefix_encoders.py), by hook
DECODERS = ("llama", "mistral", "qwen2", "gpt2",  # the decoder stack's KV cache
            "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "helium", "smollm3", "olmo", "olmo2", "phi", "phi3",
            "stablelm", "cohere", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_bigcode", "gpt_neo",
            "gptj", "codegen", "gpt_neox", "bloom", "opt", "xglm", "biogpt")
ENCODERS = ("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
            "data2vec-text", "ernie", "electra", "megatron-bert", "rembert")  # each self-attention's cache view
ENCODER_DECODERS = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "blenderbot", "blenderbot-small",
                    "plbart", "m2m_100")
SUPPORTED = DECODERS + ENCODERS + ENCODER_DECODERS
_NO_CACHE = ("its self-attention takes no KV cache argument, the only public point where keys and values "
             "can be added to an attention without copying its code")
REFUSED = {
    "distilbert": _NO_CACHE,
    "albert": _NO_CACHE + " (and its one layer is shared by every depth)",
    "deberta": _NO_CACHE + " (and its disentangled attention scores each key by its relative position)",
    "deberta-v2": _NO_CACHE + " (and its disentangled attention scores each key by its relative position)",
    "mpnet": _NO_CACHE + " (and its relative position bias is built for the input's keys only)",
    "modernbert": _NO_CACHE + " (and its local attention windows come from its own masks)",
    "longt5": "its encoder's local / transient-global attention takes no KV cache argument",
    "falcon": ("transformers 4.57's Falcon caches its keys and values repeated for every query head (new decoder "
               "architecture), not per key/value head as its projection makes them and 5.x caches them"),
    **{t: _NO_CACHE + " (vision encoder)" for t in ("vit", "deit", "vit_msn", "vit_mae", "beit", "data2vec-vision",
                                                      "dinov2", "clip_vision_model", "siglip_vision_model")},
}
_STATE = "_adapterkit_prefix"  # on a cache this hook filled: (P_max, prefix mask (B, P_max))
_PACKED = "_adapterkit_prefix_packed"  # on a cache whose owner keeps the prefixes as ordinary entries


def prefix_state(cache: Any) -> tuple[int, torch.Tensor] | None:
    """(P_max, prefix mask (B, P_max)) of a KV cache this kind's hook filled (its first P_max columns
    are the rows' prefixes); None for any other cache."""
    return getattr(cache, _STATE, None)


def mark_packed(cache: Any) -> None:
    """Declare that ``cache`` holds its rows' prefixes (if any) as ordinary entries, wherever they are,
    and that every call gives an attention mask covering them: the hook then leaves the inputs alone.
    The server's continuous decoding re-packs caches between steps (rows joining and leaving) and
    keeps the prefix columns in its own mask (``serve/decode.py``)."""
    setattr(cache, _PACKED, True)


class PrefixSite(SiteModule):
    """One layer's prefix: ``key`` and ``value``, each (P, kv_dim); or, with ``prefix_projection``, this
    layer's output Linear ``up`` of the reparameterisation MLP (the first layer's module also holds
    the shared ``embedding`` (P, d) and ``down``)."""

    def __init__(
        self,
        hidden_size: int,
        config: AdapterConfig,
        feed: str = "output",
        dims: tuple[int, int] = (0, 0),
        position: str = "",
        **factory: Any,
    ):
        super().__init__()
        self.feed = feed
        self.length, self.kv_dim = config.bottleneck_for(hidden_size), dims[1]
        if config.prefix_projection:
            width = config.prefix_hidden_size
            self.embedding = nn.Parameter(torch.empty(self.length, hidden_size, **factory))
            nn.init.normal_(self.embedding)  # N(0, 1): nn.Embedding's init, as the paper's code and PEFT
            self.down = nn.Linear(hidden_size, width, **factory)
            self.up = nn.Linear(width, 2 * self.kv_dim, **factory)
            return
        self.key = nn.Parameter(torch.empty(self.length, self.kv_dim, **factory))
        self.value = nn.Parameter(torch.empty(self.length, self.kv_dim, **factory))
        for p in (self.key, self.value):
            nn.init.normal_(p, std=config.init_std)

    @staticmethod
    def dims_from_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        """(0, kv_dim) from a file's ``key`` (P, kv_dim): only the output width shapes this module."""
        k = shapes.get("key", ())
        return 0, (k[1] if len(k) == 2 else 0)

    @property
    def projected(self) -> bool:
        """Whether this layer's prefix comes out of the reparameterisation MLP (not folded yet)."""
        return "up" in self._modules

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (key, value), each (P, kv_dim): the parameters, or the MLP's output here."""
        p = self._parameters
        if "key" in p:
            return p["key"], p["value"]
        root = self.__dict__.get("_root", self)
        hidden = torch.tanh(root.down(root.embedding))  # (P, h)
        kv = self.up(hidden)  # (P, 2 kv_dim)
        return kv[:, : self.kv_dim], kv[:, self.kv_dim :]

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The tensors whose changes change this layer's prefix (``stacks.weights_key``)."""
        p = self._parameters
        if "key" in p:
            return p["key"], p["value"]
        root = self.__dict__.get("_root", self)
        return root.embedding, root.down.weight, root.down.bias, self.up.weight, self.up.bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # plain prefixes (an artifact) into the MLP form (a run that trained through it): fold first
        if self.projected and prefix + "key" in state_dict:
            root = self.__dict__.get("_root", self)
            adapter = root.__dict__.get("_adapter")
            if adapter is not None:
                fold(adapter)
            else:
                _fold_sites([self])
        super()._load_from_state_dict(state_dict, prefix, *args)

    # The per-layer site interface: never called, the pre-hooks are this kind's only hooks.
    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        return None

    @classmethod
    def mixed_plan(cls, members: list[SiteModule | None], slots: list[int]) -> Any | None:
        return None

    @classmethod
    def apply_mixed(cls, route: Route, layer: int, position: str, plan: Any, out: torch.Tensor, captured: torch.Tensor | None):
        return out

    # -- where the hooks go ------------------------------------------------------------------------

    @classmethod
    def check_base(cls, base: nn.Module) -> None:
        """Raise ValueError unless ``base`` is an architecture these hooks are tested on (at add / load)."""
        config = base.config
        model_type = getattr(config, "model_type", None)
        if model_type in DECODERS and not getattr(config, "is_encoder_decoder", False):
            return
        if model_type in ENCODER_DECODERS:
            return
        if model_type in ENCODERS:
            if getattr(config, "is_decoder", False):
                raise ValueError(f"prefix tuning is wired up for {model_type} encoders; this config is a decoder "
                                 "(is_decoder=True), which is untested")
            kind = getattr(config, "position_embedding_type", None)
            if kind not in (None, "absolute"):  # 4.57's relative_key scores assume one query per cached step
                raise ValueError(f"prefix tuning needs absolute position embeddings; this {model_type} has "
                                 f"position_embedding_type={kind!r}, whose relative scores would count the prefix")
            return
        why = REFUSED.get(model_type, "untested")
        raise ValueError(f"prefix tuning does not support {model_type!r}: {why}. It is wired up for decoders "
                         f"({', '.join(DECODERS)}), encoders ({', '.join(ENCODERS)}) and encoder-decoders "
                         f"({', '.join(ENCODER_DECODERS)})")

    @classmethod
    def backbone_hooks(cls, base: nn.Module, layer_sites: list[Any]) -> list[tuple[nn.Module, list[int], Any]] | None:
        """Encoders and encoder-decoders: each layer's self-attention module (the value projection's
        parent), rewritten by ``apply_attention``. Decoders: the decoder stack (the module holding the
        layers; OPT's LM calls it directly, past its backbone), rewritten by ``apply_backbone``."""
        if base.config.model_type in DECODERS:
            stack = layer_sites[0].path.rpartition(".")[0].rpartition(".")[0]  # "model.decoder.layers.0" -> "model.decoder"
            return [(base.get_submodule(stack), [ls.index for ls in layer_sites], cls.apply_backbone)]
        targets = []
        for ls in layer_sites:
            name = ls.names.get("attn_v")
            if name is None or "." not in name:
                raise ValueError(f"prefix tuning needs the self-attention's value projection; layer {ls.path} has none")
            targets.append((base.get_submodule(f"{ls.path}.{name.rpartition('.')[0]}"), [ls.index], cls.apply_attention))
        return targets

    # -- decoders: the backbone's KV cache -----------------------------------------------------------

    @classmethod
    def apply_backbone(
        cls, route: Route, position: str, members: list[list[PrefixSite | None]], module: nn.Module,
        inputs: dict[str, Any], layers: list[int] | None = None,
    ) -> dict[str, Any] | None:
        """The decoder backbone's keyword inputs with each row's prefix in the KV cache and the mask.

        ``members[layer][k]``: adapter k's prefix at that layer (None: absent or another kind);
        ``inputs``: the backbone's arguments by name. None: no row has a prefix here.
        """
        # each distinct adapter's P (0: not a prefix adapter); every layer of a prefix adapter has one
        lengths = [0 if m is None else m.length for m in members[0]]
        p_max = max(lengths, default=0)
        if p_max == 0:
            return None
        names = _forward_params(module)
        cache_name = "cache" if "cache" in names else "past_key_values"
        _check_route(route)
        x = inputs.get("input_ids")
        x = inputs.get("inputs_embeds") if x is None else x
        if x is None:
            raise ValueError("prefix tuning needs input_ids or inputs_embeds to size its prefix")
        n, t = x.shape[0], x.shape[1]
        cache = inputs.get(cache_name)
        if getattr(cache, _PACKED, False):  # prefixes already cached and masked by the caller
            return None
        state = getattr(cache, _STATE, None)
        if state is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a prefix adapter needs to start from an empty KV cache (this one holds tokens "
                                 "it did not prefix, e.g. a re-packed cache); pass none or an empty DynamicCache")
            if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
                raise ValueError("prefix tuning does not work with gradient checkpointing in training: transformers "
                                 "drops the KV cache in checkpointed layers; gradient_checkpointing_disable() first")
            cache = _filled_cache(route, members, module, cache, p_max, n)
            prefix_mask = _prefix_keep(route, lengths, p_max, n, x.device, left=False).long()
            setattr(cache, _STATE, (p_max, prefix_mask))
            past = 0
        else:
            p_max, prefix_mask = state
            past = cache.get_seq_length() - p_max  # real tokens cached so far
            if prefix_mask.shape[0] != n:
                raise ValueError(f"this KV cache was prefixed for {prefix_mask.shape[0]} rows; the batch has {n}")
        window = _attention_window(getattr(module, "config", None))
        if window is not None and p_max + past + t > window:
            raise ValueError(
                f"prefix tuning needs the prefix inside every token's attention window: this model's sliding / local "
                f"attention sees {window} positions, and {p_max} prefix positions + {past + t} tokens exceed it (a "
                f"token past the window would not see the prefix, and a batch's padding would move it out sooner than "
                f"for the row alone)")
        mask = inputs.get("attention_mask")
        if mask is None:  # 5.x generate drops an all-ones mask; the prefix block needs one beside it
            mask = torch.ones(n, past + t, dtype=torch.long, device=x.device)
        elif mask.dim() != 2:
            raise ValueError("prefix tuning needs a 2-D attention mask (B, T); got a mask of shape "
                             f"{tuple(mask.shape)}")
        out = dict(inputs)
        out[cache_name] = cache
        out["attention_mask"] = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)  # (B, P_max + L + T)
        cache_position = inputs.get("cache_position")
        if inputs.get("position_ids") is None:  # as without the prefix: from the cache position or arange
            start = cache_position if cache_position is not None else torch.arange(past, past + t, device=x.device)
            out["position_ids"] = start.unsqueeze(0)
        if cache_position is not None:  # transformers 4.57: an index into the cache, prefix included
            out["cache_position"] = cache_position + p_max
        return out

    # -- encoders, encoder-decoders: each self-attention's inputs -----------------------------------

    @classmethod
    def apply_attention(
        cls, route: Route, position: str, members: list[list[PrefixSite | None]], module: nn.Module,
        inputs: dict[str, Any], layers: list[int],
    ) -> dict[str, Any] | None:
        """One self-attention module's keyword inputs: a cache view putting each row's prefix before its
        keys and values, the mask widened by the prefix columns (and T5 4.57's cache position shifted).

        ``members[0][k]``: adapter k's prefix at this layer (``layers[0]``). None: no row has one.
        """
        per = members[0]
        lengths = [0 if m is None else m.length for m in per]
        p_max = max(lengths, default=0)
        if p_max == 0:
            return None
        _check_route(route)
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"prefix tuning on encoders needs eager or sdpa attention (4-D masks); this model "
                             f"runs {implementation!r}: load it with attn_implementation='sdpa'")
        names = _forward_params(module)
        cache_name = "cache" if "cache" in names else "past_key_values"
        mask_name = "attention_mask" if "attention_mask" in names else "mask"
        x = inputs["hidden_states"]  # (B, T, d)
        n, t = x.shape[0], x.shape[1]
        real = inputs.get(cache_name)
        own = getattr(real, "self_attention_cache", real)  # an encoder-decoder's: the decoder's own part
        layer_idx = getattr(module, "layer_idx", None) or 0
        past = 0 if own is None else int(own.get_seq_length(layer_idx))
        # in the activations' dtype and device (the layer's own; weights may be quantised or elsewhere)
        keys, values = _layer_prefix(route, per, layers[0], p_max, n, x.dtype, x.device, left=True)
        keep = _prefix_keep(route, lengths, p_max, n, x.device, left=True)  # (B, P_max)
        causal = bool(getattr(module, "is_causal", False) or getattr(module, "is_decoder", False))
        out = dict(inputs)
        out[mask_name] = _widened_mask(inputs.get(mask_name), keep, n, t, past + t, causal, x.dtype)
        cache_position = inputs.get("cache_position")
        out[cache_name] = _PrefixedCache(keys, values, own, p_max, cache_position)
        if "cache_position" in names:  # 4.57: an index into the cache, which now starts with the prefix
            start = cache_position if cache_position is not None else torch.arange(past, past + t, device=x.device)
            out["cache_position"] = start + p_max
        return out


class _PrefixedCache:
    """What one self-attention module sees as its KV cache: this layer's prefix of every row, then what
    the real cache holds (a decoder's; None in an encoder), which is updated as without the prefix."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: Any, p_max: int, cache_position: Any):
        self.keys, self.values = keys, values  # (B, P_max, kv_dim) each
        self.cache, self.p_max, self.cache_position = cache, p_max, cache_position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, P_max + L + T, D) keys and values: the prefix, then the real cache's after this update."""
        if self.cache is not None:
            if args and isinstance(args[0], dict) and "cache_position" in args[0]:  # 4.57: the real index
                args = ({**args[0], "cache_position": self.cache_position}, *args[1:])
            key_states, value_states = self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        b, h, _, d = key_states.shape
        k, v = (p.to(key_states.dtype).reshape(b, self.p_max, h, d).transpose(1, 2) for p in (self.keys, self.values))
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens before the new ones, prefix included (T5's relative positions count from here)."""
        return self.p_max + (0 if self.cache is None else self.cache.get_seq_length(layer_idx or 0))

    def __getattr__(self, name: str) -> Any:
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _attention_window(config: Any) -> int | None:
    """The attention window of a decoder's sliding / local layers (Mistral's ``sliding_window``, GPT-Neo's
    ``window_size``), or None where every layer attends to the whole cache."""
    kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    if kinds is not None and not any(k in ("sliding_attention", "local") for k in kinds):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    for name in ("sliding_window", "window_size"):
        window = getattr(config, name, None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            return window
    return None


def _check_route(route: Route) -> None:
    if hasattr(route, "groups"):  # composition.CompositeRoute: rows are compositions, not one adapter each
        raise ValueError("prefix adapters cannot be composed (Stack / Average / Parallel) yet; route them alone")
    if getattr(route, "drop_below", 0):  # AdapterDrop: one mask serves every layer (see leave_out)
        raise ValueError("prefix tuning cannot drop the adapters of the lowest layers (AdapterDrop)")


def _widened_mask(mask: torch.Tensor | None, keep: torch.Tensor, n: int, t: int, s: int, causal: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """The attention's 4-D mask (B or 1, 1, T or 1, S) with the prefix columns first: (B, 1, T or 1,
    P_max + S), in the incoming mask's form (bool: True attends; float: added, 0 or the dtype's min).
    With no mask (sdpa without padding) a float one: all keys, or causal aligned to the last query."""
    p_max = keep.shape[1]
    if mask is None:
        if causal:
            seen = torch.arange(s, device=keep.device)[None] <= torch.arange(s - t, s, device=keep.device)[:, None]
            body = seen[None, None].expand(n, 1, t, s)  # (B, 1, T, S)
        else:
            body = torch.ones(n, 1, 1, s, dtype=torch.bool, device=keep.device)
        allowed = torch.cat([keep[:, None, None, :].expand(n, 1, body.shape[2], p_max), body], dim=-1)
        return torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError("prefix tuning needs the attention's mask as a 4-D tensor; got "
                         f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
    if mask.dtype == torch.bool:
        block = keep
    else:
        block = torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill_(~keep, torch.finfo(mask.dtype).min)
    heads, rows = mask.shape[1], mask.shape[2]
    block = block[:, None, None, :].expand(n, heads, rows, p_max)
    return torch.cat([block.to(mask.device), mask.expand(n, heads, rows, mask.shape[3])], dim=-1)


_PARAMS: dict[type, frozenset[str]] = {}  # module class -> its forward's parameter names


def _forward_params(module: nn.Module) -> frozenset[str]:
    """A forward's parameter names (``cache`` on transformers 5.x, ``past_key_values`` on 4.57)."""
    names = _PARAMS.get(type(module))
    if names is None:
        names = _PARAMS[type(module)] = frozenset(inspect.signature(type(module).forward).parameters)
    return names


def _layer_prefix(route: Route, per: list[PrefixSite | None], layer: int, p_max: int, n: int,
                  dtype: torch.dtype, device: torch.device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (key, value) at one layer, (B, P_max, kv_dim) each; a shorter prefix zero-padded
    before (``left``) or after it, rows without one all zeros (their mask hides them)."""
    live = next((m for m in per if m is not None), None)
    if live is None:  # leave_out is refused: every prefix adapter has every layer
        raise ValueError(f"prefix adapter has no prefix at layer {layer}")
    if route.single is not None:
        k, v = (p.to(dtype)[None].expand(n, -1, -1) for p in live.prefix())
        return k, v
    kv_dim = live.kv_dim

    def zeros() -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(p_max, kv_dim, dtype=dtype, device=device)
        return z, z.clone()

    def pack(m: PrefixSite) -> tuple[torch.Tensor, ...]:  # (P_max, kv_dim)
        pad = (0, 0, p_max - m.length, 0) if left else (0, 0, 0, p_max - m.length)
        return tuple(F.pad(p.to(dtype), pad) for p in m.prefix())

    k, v = route.gather(("prefix", layer, p_max, left), per, dtype, device, zeros, pack)  # (rows, P_max, kv_dim)
    return route.expand(k, n), route.expand(v, n)


def _filled_cache(route: Route, members: list[list[PrefixSite | None]], module: nn.Module, cache: Any, p_max: int, n: int):
    """A DynamicCache (the one passed in, when empty, else a new one) holding every row's prefix."""
    from transformers import DynamicCache  # the kinds import no transformers until a prefix is used

    if cache is None:
        accepts_config = "config" in inspect.signature(DynamicCache.__init__).parameters
        cache = DynamicCache(config=module.config) if accepts_config else DynamicCache()
    elif not isinstance(cache, DynamicCache):
        raise ValueError(f"prefix tuning fills a DynamicCache; got a {type(cache).__name__}")
    config = module.config
    ref = next(module.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, per in enumerate(members):
        k, v = _layer_prefix(route, per, layer, p_max, n, ref.dtype, ref.device, left=False)  # (B, P_max, kv_dim)
        shape = (n, -1, k.shape[-1] // head_dim, head_dim)
        cache.update(k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2), layer)  # (B, H_kv, P, D)
    return cache


def _prefix_keep(route: Route, lengths: list[int], p_max: int, n: int, device: torch.device, left: bool) -> torch.Tensor:
    """(B, P_max) bool: True on each row's own prefix columns (the last P with ``left`` padding, else the
    first P), False on padding and on rows without a prefix."""
    key = ("prefix_keep", p_max, left, device, torch.is_inference_mode_enabled())
    per_row = route.cache.get(key)
    if per_row is None:
        own = torch.tensor([0] + lengths, device=device)[route.slot_index(device)]  # (rows,) each row's P
        columns = torch.arange(p_max, device=device)[None]
        per_row = route.cache[key] = columns >= (p_max - own)[:, None] if left else columns < own[:, None]
    if route.single is not None:
        return per_row[:1].expand(n, -1)
    return route.expand(per_row, n)


# -- the reparameterisation MLP: one input stage for all layers, folded for artifacts ---------------


def _sites(adapter: nn.Module) -> list[tuple[int, PrefixSite]]:
    """(layer, module) of every layer of a prefix adapter that has one."""
    return [(i, la.site("prefix")) for i, la in enumerate(adapter.layers)
            if la is not None and isinstance(la.site("prefix"), PrefixSite)]


def _link(adapter: nn.Module) -> None:
    """With ``prefix_projection``: every layer's MLP takes the first layer's ``embedding`` and ``down``
    (the others' are dropped before anything trains); plain references, so each is saved once."""
    sites = [s for _, s in _sites(adapter)]
    if not sites or not sites[0].projected:
        return
    root = sites[0]
    root.__dict__["_adapter"] = adapter  # a plain reference (not a submodule): for fold on load
    for s in sites[1:]:
        del s.embedding, s.down
        s.__dict__["_root"] = root


def _folded(adapter: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> its (key, value) as the MLP gives them now, detached copies."""
    with torch.no_grad():
        return {i: tuple(p.detach().clone() for p in s.prefix()) for i, s in _sites(adapter) if s.projected}


def _plain_config(config: AdapterConfig) -> AdapterConfig:
    return dataclasses.replace(config, prefix_projection=False, prefix_hidden_size=None)


def _export(adapter: nn.Module) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict[str, Any]]:
    """The artifact form of a prefix adapter: with the MLP, each layer's prefix folded into plain
    ``key`` / ``value`` (the adapter is not changed), a plain config, and ``trained_with`` metadata."""
    state = adapter.state_dict()
    folded = _folded(adapter)
    if not folded:
        return state, adapter.config, {}
    for i, (key, value) in folded.items():
        for name in [k for k in state if k.startswith(f"layers.{i}.prefix.")]:
            del state[name]
        state[f"layers.{i}.prefix.key"], state[f"layers.{i}.prefix.value"] = key, value
    trained = {"prefix_projection": True, "prefix_hidden_size": adapter.config.prefix_hidden_size}
    return state, _plain_config(adapter.config), {"trained_with": trained}


def _fold_sites(sites: list[PrefixSite]) -> None:
    """Each module's MLP output becomes its plain ``key`` / ``value`` parameters, in place."""
    with torch.no_grad():
        values = [tuple(p.detach().clone() for p in s.prefix()) for s in sites]  # before any MLP goes
    for s, (key, value) in zip(sites, values):
        grad = s.up.weight.requires_grad
        for name in ("embedding", "down", "up"):
            if name in s._parameters or name in s._modules:
                delattr(s, name)
        s.__dict__.pop("_root", None)
        s.__dict__.pop("_adapter", None)
        s.key, s.value = nn.Parameter(key, requires_grad=grad), nn.Parameter(value, requires_grad=grad)
        bump_epoch(s)  # stacked copies of the old form are stale


def fold(adapter: nn.Module) -> None:
    """Fold a prefix adapter's reparameterisation MLP into plain per-layer prefixes, in place: every
    layer keeps the prefix it had, its config becomes a plain prefix config. A no-op when plain."""
    sites = [s for _, s in _sites(adapter) if s.projected]
    if sites:
        _fold_sites(sites)
        adapter.config = _plain_config(adapter.config)


def _prepare(config: AdapterConfig) -> None:
    """Prefix tuning's defaults and refusals, before the common checks: P = bottleneck_size = 10."""
    if config.reduction_factor is not None:
        raise ValueError("a prefix's length is bottleneck_size (virtual tokens), not a reduction_factor")
    if config.bottleneck_size is None:
        config.bottleneck_size = DEFAULT_LENGTH
    if config.alpha is not None or config.targets is not None or config.rslora:
        raise ValueError("alpha, targets and rslora are LoRA / IA3 options; prefix tuning takes none of them")
    if config.scaling not in (None, 1.0):
        raise ValueError("prefix tuning takes no scaling")
    if config.dropout:
        raise ValueError("prefix tuning takes no dropout")
    if config.leave_out:
        raise ValueError("prefix tuning cannot leave layers out: one attention mask covers the prefix in every "
                         "layer, so each layer needs its own prefix")
    if not isinstance(config.prefix_projection, bool):
        raise ValueError(f"AdapterConfig.prefix_projection must be True or False; got {config.prefix_projection!r}")
    width = config.prefix_hidden_size
    if not config.prefix_projection:
        if width is not None:
            raise ValueError("prefix_hidden_size is the reparameterisation MLP's width: give prefix_projection=True too")
        return
    if width is None:
        config.prefix_hidden_size = DEFAULT_HIDDEN
    elif isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"AdapterConfig.prefix_hidden_size must be a positive integer; got {width!r}")


KIND = AdapterKind(
    name="prefix",
    sites={"prefix": "output"},
    module=PrefixSite,
    summary="prefix tuning: learned keys and values per layer, attended to before the input (length = bottleneck_size)",
    order=112,
    sized_by_site=True,
    prepare=_prepare,
    link=_link,
    export=_export,
)
