"""CPU speed of the local model's generation (2 cores, float32), measured in
``benchmarks/bench_augment.py``:

- :class:`DecodeLinear`: for the few rows of a decode step, ``W @ x.T`` is 1.4-1.9x faster here
  than ``F.linear(x, W)`` (the same matrix product; oneDNN's ``x @ W.T`` path is slow for small M,
  the language-model head most of all), while ``F.linear`` stays faster for prompt-sized inputs.
- :class:`GrowingCache`: a key/value cache that writes each step into preallocated room instead
  of concatenating every layer's whole cache at every step (``DynamicCache``: O(length) copies
  per token, ~15 % of a batch's time).
- :class:`W8A8Linear` (``augment.quantize: w8a8``): int8 weights (one scale per output channel)
  times int8 activations (one scale per token, so a row never depends on the other rows of its
  batch or on their padding) by ``torch._int_mm``, int32 accumulation: the matrix products ran
  ~4x faster than float32 here (AVX-512 VNNI; the benchmark prints the CPU's flags), all but
  :data:`W8A8_FLOAT_LAYERS`.
- :func:`prefix_attention`: the prompt prefix every row shares (the system prompt, ~130-170 of a
  row's ~250 positions) is kept once, not once per row, and attended by one matrix product for
  the whole batch, instead of each row's attention reading its own copy.

Imported inside the backend only (torch and transformers are heavy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SPARE = 64  # positions of room a GrowingLayer keeps ahead (so most steps write in place)
SMALL_M = 256  # rows up to which W @ x.T is used (measured: faster up to 128, slower at 2,240)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` that computes ``(W @ x.T).T`` for inputs of at most :data:`SMALL_M` rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > SMALL_M:
            return F.linear(x, self.weight, self.bias)
        out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


class W8A8Linear(nn.Module):
    """A float32 ``nn.Linear`` as int8 weights and int8 activations: ``y = (q(x) @ q(W).T) *
    s_x * s_W (+ bias)`` with symmetric round-to-nearest scales, ``s_W`` per output channel
    (``max |W[n, :]| / 127``) and ``s_x`` per row of the input (``max |x[m, :]| / 127``), computed
    at every call, so a row's output does not depend on the other rows of the batch."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", q.t())  # [in, out] view of the [out, in] int8 matrix
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fastest spelling timed on these shapes (one thread, 2,944 x 576 and 64 x 576):
        # abs().amax() ~10x linalg.vector_norm(inf); int32 -> float, then in-place products ~10x
        # one mixed int32 * float mul
        x2 = x.reshape(-1, self.in_features).float()
        scale = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        xq = x2.div(scale).round_().to(torch.int8)  # |x / scale| <= 127 by construction
        out = torch._int_mm(xq, self.qweight_t).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


#: layers ``augment.quantize: w8a8`` keeps in float32: the MLP's output projection, whose input
#: (silu(gate) * up) has outlier channels that one int8 scale per token flattens. Measured side
#: by side on 256 MovieLens items, guided x64, one thread (README, Generative augmentation): every
#: layer int8 = 2.06x float32's items/s but 233 of 256 replies passing the schema (float32: 248);
#: down_proj in float32 = 1.58x and 245 of 256.
W8A8_FLOAT_LAYERS = ("down_proj",)


def use_w8a8_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (the language-model head too; the input
    embedding keeps its float32 table) by a :class:`W8A8Linear`, except those whose qualified
    name ends with one of ``skip``; returns how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not name.endswith(skip)]
    for name, module in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, W8A8Linear(module))
    return len(targets)


def use_decode_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`DecodeLinear` (same weights);
    returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            n += 1
    return n


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views into a buffer with spare room along the
    sequence axis (grown by doubling), so an update writes only the new positions."""

    def _set(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        self._k, self._v, self._len = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def _rebuild(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        """Copy ``keys``/``values`` (all their positions) into new buffers with ``spare`` room."""
        shape = (keys.shape[0], keys.shape[1], keys.shape[2] + spare, keys.shape[3])
        k, v = keys.new_empty(shape), values.new_empty(shape)
        k[:, :, :keys.shape[2]] = keys
        v[:, :, :values.shape[2]] = values
        self._set(k, v, keys.shape[2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._set(key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1])),
                      value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1])), 0)
        n = key_states.shape[-2]
        end = self._len + n
        if end > self._k.shape[-2]:
            self._rebuild(self.keys, self.values, max(n, self._len, SPARE))
        self._k[:, :, self._len:end] = key_states
        self._v[:, :, self._len:end] = value_states
        self._set(self._k, self._v, end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._rebuild(self.keys[indices], self.values[indices], SPARE)


class GrowingCache(DynamicCache):
    """``DynamicCache`` made of :class:`GrowingLayer` s."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer


PREFIX_ATTENTION = "genre_prefix"


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over ``module.shared_prefix`` = (keys, values) of shape [kv heads, P, head dim],
    which every row of the batch sees in full, followed by the row's own ``key``/``value``
    (masked by ``attention_mask``: a 4D boolean [batch, 1, queries, keys], True = attend).
    Without a shared prefix: transformers' SDPA attention."""
    prefix = getattr(module, "shared_prefix", None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    kp, vp = prefix
    batch, heads, q_len, dim = query.shape
    kv_heads, p_len = kp.shape[0], kp.shape[1]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, kv_heads, rep * q_len, dim)  # rows of a kv head: (repeat, query)
    # the prefix for all rows at once: [kv heads, batch * rep * q, dim] @ [kv heads, dim, P]
    qh = q.transpose(0, 1).reshape(kv_heads, batch * rep * q_len, dim)
    sp = torch.bmm(qh, kp.transpose(1, 2)).view(kv_heads, batch, rep * q_len, p_len).transpose(0, 1)
    ss = torch.matmul(q, key.transpose(-1, -2))
    if attention_mask is not None:
        ss = ss.masked_fill(~attention_mask.repeat(1, 1, rep, 1), float("-inf"))
    probs = torch.cat([sp, ss], dim=-1).mul_(scale).softmax(-1)
    pp = probs[..., :p_len].transpose(0, 1).reshape(kv_heads, batch * rep * q_len, p_len)
    out = torch.bmm(pp, vp).view(kv_heads, batch, rep * q_len, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., p_len:], value)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def use_prefix_attention(model: nn.Module) -> None:
    """Make ``model`` attend with :func:`prefix_attention` (SDPA unless a prefix is set)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PREFIX_ATTENTION)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules in layer order (the ones with ``layer_idx``)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
