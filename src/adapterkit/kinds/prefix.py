"""Prefix tuning, Li & Liang 2021 (arXiv 2101.00190): P learned key and value vectors per layer that
every real token attends to, as if P virtual tokens came before the input.

Parameters per layer: ``key`` and ``value``, each (P, kv_dim), kv_dim = kv_heads * head_dim (the
value projection's output: GPT-2's part of ``c_attn``, grouped-query attention's narrower ``v_proj``).
They are the attention's cached keys and values themselves (after RoPE, so they carry no position).
No reparameterisation MLP: the vectors are trained directly (the paper's MLP is a training aid that
is dropped after training; its absence only changes optimisation, not what is stored or served).

Hooks, no copied model code: one forward pre-hook on the decoder backbone (the module holding the
layers, ``model.model`` / ``model.transformer``; ``attach.py``) rewrites its keyword inputs. When the
incoming KV cache is empty (no cache, or the first step of ``generate``), it fills a ``DynamicCache``
with each row's prefix, (B, kv_heads, P_max, head_dim) per layer, zero-padded for rows with a shorter
prefix or none; on every call it prepends a (B, P_max) block to the attention mask (1 on a row's own
prefix positions, 0 on padding and on rows without a prefix: masked exactly, so each row computes what
it would alone) and keeps the position ids the tokens would have without the prefix. transformers
4.57's ``cache_position`` (an index into the cache) is shifted by P_max; 5.x has none.

A mixed batch gathers each row's padded prefix from the model's stacks (``Route.gather``), so rows of
other kinds (LoRA, bottlenecks: their own hooks) and rows without an adapter share the batch.

Refused, with the reason: encoder-decoders and encoders (no causal KV cache to prefix), decoders other
than the tested llama / mistral / qwen2 / gpt2 rows, ``leave_out`` (one attention mask serves every
layer, so a layer cannot go without its prefix while the others keep theirs), gradient checkpointing
in training (transformers drops the KV cache in checkpointed layers), a non-empty cache that did not
start with this prefix (unless ``mark_packed``: the server's continuous decoding re-packs caches and
masks the prefix columns itself), a 4-D attention mask.

Config: the prefix length P is ``bottleneck_size`` (default 10); ``init_std`` the std of the normal
init. Shapes: B rows, T new tokens, P_max the longest prefix in the batch, L cached tokens.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .interface import AdapterKind, SiteModule

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..routing import Route

DEFAULT_LENGTH = 10
# model_type rows whose backbones the prefix hook is tested on (tests/core/test_prefix.py)
SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")
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
    """One layer's prefix: ``key`` and ``value``, each (P, kv_dim)."""

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
        length, kv_dim = config.bottleneck_for(hidden_size), dims[1]
        self.key = nn.Parameter(torch.empty(length, kv_dim, **factory))
        self.value = nn.Parameter(torch.empty(length, kv_dim, **factory))
        for p in (self.key, self.value):
            nn.init.normal_(p, std=config.init_std)

    @staticmethod
    def dims_from_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        """(0, kv_dim) from a file's ``key`` (P, kv_dim): only the output width shapes this module."""
        k = shapes.get("key", ())
        return 0, (k[1] if len(k) == 2 else 0)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        p = self._parameters
        return p["key"], p["value"]

    @property
    def length(self) -> int:
        return self._parameters["key"].shape[0]

    # The per-layer site interface: never called, the backbone hook is this kind's only hook.
    def apply_single(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        return None

    @classmethod
    def mixed_plan(cls, members: list[SiteModule | None], slots: list[int]) -> Any | None:
        return None

    @classmethod
    def apply_mixed(cls, route: Route, layer: int, position: str, plan: Any, out: torch.Tensor, captured: torch.Tensor | None):
        return out

    # -- the backbone hook -------------------------------------------------------------------------

    @classmethod
    def check_base(cls, base: nn.Module) -> None:
        """Raise ValueError unless ``base`` is a decoder this hook is tested on (at add / load time)."""
        config = base.config
        model_type = getattr(config, "model_type", None)
        if getattr(config, "is_encoder_decoder", False) or model_type not in SUPPORTED:
            raise ValueError(
                f"prefix tuning is wired up for decoder-only {', '.join(SUPPORTED)} models; got {model_type!r} "
                "(encoders and encoder-decoders have no causal KV cache to prefix; other decoders are untested)"
            )

    @classmethod
    def apply_backbone(
        cls, route: Route, position: str, members: list[list[PrefixSite | None]], module: nn.Module, inputs: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The backbone's keyword inputs with each row's prefix in the KV cache and the attention mask.

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
        if hasattr(route, "groups"):  # composition.CompositeRoute: rows are compositions, not one adapter each
            raise ValueError("prefix adapters cannot be composed (Stack / Average / Parallel) yet; route them alone")
        if getattr(route, "drop_below", 0):  # AdapterDrop: one mask serves every layer (see leave_out)
            raise ValueError("prefix tuning cannot drop the adapters of the lowest layers (AdapterDrop)")
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
            prefix_mask = _prefix_mask(route, lengths, p_max, n, x.device)
            setattr(cache, _STATE, (p_max, prefix_mask))
            past = 0
        else:
            p_max, prefix_mask = state
            past = cache.get_seq_length() - p_max  # real tokens cached so far
            if prefix_mask.shape[0] != n:
                raise ValueError(f"this KV cache was prefixed for {prefix_mask.shape[0]} rows; the batch has {n}")
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


_PARAMS: dict[type, frozenset[str]] = {}  # backbone class -> its forward's parameter names


def _forward_params(module: nn.Module) -> frozenset[str]:
    """The backbone forward's parameter names (``cache`` on transformers 5.x, ``past_key_values`` on 4.57)."""
    names = _PARAMS.get(type(module))
    if names is None:
        names = _PARAMS[type(module)] = frozenset(inspect.signature(type(module).forward).parameters)
    return names


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
    dtype, device = ref.dtype, ref.device
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, per in enumerate(members):
        live = next((m for m in per if m is not None), None)
        if live is None:  # leave_out is refused: every prefix adapter has every layer
            raise ValueError(f"prefix adapter has no prefix at layer {layer}")
        kv_dim = live.key.shape[1]
        if route.single is not None:
            k, v = (p.to(dtype)[None].expand(n, -1, -1) for p in live.params)  # (B, P, kv_dim)
        else:
            def zeros(kv_dim: int = kv_dim) -> tuple[torch.Tensor, torch.Tensor]:
                z = torch.zeros(p_max, kv_dim, dtype=dtype, device=device)
                return z, z.clone()

            def pack(m: PrefixSite) -> tuple[torch.Tensor, ...]:  # (P_max, kv_dim), zeros after its own P
                return tuple(F.pad(p.to(dtype), (0, 0, 0, p_max - m.length)) for p in m.params)

            k, v = route.gather(("prefix", layer, p_max), per, dtype, device, zeros, pack)  # (rows, P_max, kv_dim)
            k, v = route.expand(k, n), route.expand(v, n)
        shape = (n, -1, kv_dim // head_dim, head_dim)
        cache.update(k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2), layer)  # (B, H_kv, P, D)
    return cache


def _prefix_mask(route: Route, lengths: list[int], p_max: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, P_max): 1 on each row's own prefix positions, 0 on padding and on rows without a prefix."""
    key = ("prefix_mask", p_max, device, torch.is_inference_mode_enabled())
    per_row = route.cache.get(key)
    if per_row is None:
        own = torch.tensor([0] + lengths, device=device)[route.slot_index(device)]  # (rows,) each row's P
        per_row = route.cache[key] = (torch.arange(p_max, device=device)[None] < own[:, None]).long()
    if route.single is not None:
        return per_row[:1].expand(n, -1)
    return route.expand(per_row, n)


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


KIND = AdapterKind(
    name="prefix",
    sites={"prefix": "output"},
    module=PrefixSite,
    summary="prefix tuning: learned keys and values per layer, attended to before the input (length = bottleneck_size)",
    order=112,
    sized_by_site=True,
    prepare=_prepare,
)
