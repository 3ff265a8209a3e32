"""One readable decoder-only transformer for Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma 3.

Shape letters: B batch, T new tokens in this call, S keys visible (cache + new), D hidden_size,
H query heads, Hkv key/value heads, hd head_dim, V vocab, F intermediate_size.

Module names equal transformers' *ForCausalLM classes (Llama, Mistral, Qwen2, Qwen3, Gemma3), so
parameter names equal the checkpoint's and PEFT adapter keys are `base_model.model.` + our module name.

Per block (pre-norm residual); each family is this block with the traits of its entry in
models/config.py's FAMILIES (`cfg.traits`), named in brackets:
  h = x + attn(norm_in(x));                   y = h + mlp(norm_pre_ff(h))
  h = x + norm_post(attn(norm_in(x)));        y = h + norm_post_ff(mlp(norm_pre_ff(h)))   [sandwich_norms]
  RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w              (result cast to the input dtype before * w)
             = (x / sqrt(mean(x^2) + eps) * (1 + w))  in float32, then cast           [norm_offset 1]
  mlp(x) = down(act(gate(x)) * up(x)),  act = cfg.hidden_act (SiLU, or GELU-tanh)
  attn: q, k, v projections (with bias: attention_bias, or [qkv_bias] on q, k, v only); q and k
        normalized per head over hd [qk_norm]; RoPE rotates q, k by position (sliding layers with
        their own base [local_rope]); softmax(q k^T * scale + mask) v with GQA (each kv head serves
        H/Hkv query heads), scale = hd**-0.5 or query_pre_attn_scalar**-0.5 [attn_scalar]. Sliding
        layers mask keys older than the window.
Embeddings can be scaled by sqrt(D) (rounded to the weight dtype, as the reference does)
[embedding_scale], and attention scores and final logits soft-capped: cap * tanh(z / cap) (when the
config sets the caps).
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from .config import FULL, SLIDING, ModelConfig
from .ops import additive_mask, attention, gated_act, gated_act_plain, rebuilt_in_backward, rms_norm
from .recompute import selective_context

# The adapter of each row (B,) of the forward in progress; see adapter_rows.
_ADAPTER_IDS: ContextVar[torch.Tensor | None] = ContextVar("adapter_ids", default=None)


def adapter_rows() -> torch.Tensor | None:
    """The adapter index of each row (B,) of the forward in progress, -1 for the base alone, or None when
    the call gave no adapter_ids. The model stays LoRA-agnostic: layers that carry several adapters read
    it (minilora/lora/multi.py)."""
    return _ADAPTER_IDS.get()


@contextlib.contextmanager
def adapters_per_row(adapter_ids, batch_size: int, device):
    """Inside the block adapter_rows() returns `adapter_ids` as a (B,) long tensor on `device`; None
    leaves the enclosing value (generate sets it once for all its steps)."""
    if adapter_ids is None:
        yield
        return
    ids = adapter_ids if isinstance(adapter_ids, torch.Tensor) else None
    if ids is None and isinstance(adapter_ids, (list, tuple)) and all(type(a) is int for a in adapter_ids):
        ids = torch.tensor(adapter_ids, dtype=torch.long)
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:  # 0.5 was row 0
        raise ValueError(
            f"adapter_ids={adapter_ids!r} must be integers, one adapter index per row (-1 for the base alone); "
            "pass a list of ints such as [0, 1, -1]."
        )
    ids = ids.to(device=device, dtype=torch.long)
    if ids.shape != (batch_size,):
        raise ValueError(
            f"adapter_ids has shape {tuple(ids.shape)} but the batch has {batch_size} rows; pass one adapter "
            "index per row (-1 for the base alone)."
        )
    token = _ADAPTER_IDS.set(ids)
    try:
        yield
    finally:
        _ADAPTER_IDS.reset(token)


class RMSNorm(nn.Module):
    """Root-mean-square norm scaling by (offset + w): offset 0 is Llama's norm, offset 1 Gemma's, computed
    in float32 (ops.rms_norm's two forms). Keeps its input in its own dtype for backward, not a
    float32 copy."""

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.gemma = eps, offset == 1.0
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # offset + w = 1: the identity scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with optional `linear` or `llama3` scaling.

    llama3: wavelengths 2*pi/f longer than L/low_freq_factor are divided by `factor`, shorter than
    L/high_freq_factor kept, and in between interpolated with s = (L/wavelen - low)/(high - low):
    f' = (1 - s) f/factor + s f, where L = original_max_position_embeddings.
    """
    # Built on the CPU explicitly so it is real even when the model is built on the meta device.
    idx = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (theta ** (idx / head_dim))  # (hd/2,)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of position * inv_freq in float32, each (B, T, hd) with the two halves repeated."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by angle pos*f_i: x*cos + rotate_half(x)*sin. x: (B, H, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]


def check_inputs(input_ids, vocab_size: int, **same_shape) -> None:
    """ValueError, one sentence, for input_ids that are not a (B, T) integer tensor of ids below vocab_size,
    or a (B, T) argument of another shape (attention_mask, position_ids, segment_ids; None is fine). The
    range is checked on the CPU only: on a GPU it would wait for the device on every decoding step."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be a (B, T) tensor of token ids, not a {type(input_ids).__name__}; "
            "pass torch.tensor([ids])."
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}; pass ids[None] for one sequence."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, not {input_ids.dtype}; pass ids.long().")
    for name, t in same_shape.items():
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}; "
                f"pass one {name} entry per token."
            )
    if input_ids.device.type == "cpu" and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids holds token id {bad}, outside the model's vocabulary of {vocab_size} "
                f"(0 to {vocab_size - 1}); encode the text with this model's tokenizer."
            )


def sdpa_takes_gqa(q, k, v, mask) -> bool:
    """Whether scaled_dot_product_attention can take k, v with Hkv < H heads (enable_gqa, torch >= 2.5)
    in a fused kernel for these inputs (the CPU and CUDA flash kernels can; the math fallback would
    repeat k, v itself and build the (B, H, T, S) scores, so there the caller repeats and keeps the
    fused kernel that dense heads get)."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, mask is None, enable_gqa=True)
    except (TypeError, RuntimeError):  # torch < 2.5 (no enable_gqa), or a device without the check
        return False
    return choice != SDPBackend.MATH.value


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_logit_softcapping
        D, b = cfg.hidden_size, cfg.attention_bias
        qkv_b = b or cfg.traits.qkv_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=qkv_b)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=qkv_b)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=qkv_b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=b)
        if cfg.traits.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.traits.norm_offset)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.traits.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache=None):
        """x: (B, T, D); cos/sin: (B, T, hd); mask: (B, 1, T, S) bool (True = may attend) or additive in
        x's dtype (0 / -inf, additive_mask), or None for plain causal attention over T == S (SDPA's
        is_causal: FlashAttention on a GPU)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd)
        rep = self.n_heads // self.n_kv
        gqa = rep > 1 and self.softcap is None and sdpa_takes_gqa(q, k, v, mask)
        if rep > 1 and not gqa:
            # GQA by hand: repeat each kv head for its `rep` query heads (transformers' repeat_kv order)
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        if self.softcap is None:
            # enable_gqa: query head h reads kv head h // rep, and backward keeps k, v unrepeated
            out = attention(q, k, v, mask, self.scale, gqa)  # (B, H, T, hd)
        else:
            # SDPA cannot soft-cap scores, so this path spells attention out.
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, S): causal
            scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
            scores = self.softcap * torch.tanh(scores / self.softcap)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*hd)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, F_, bias=b)
        self.up_proj = nn.Linear(D, F_, bias=b)
        self.down_proj = nn.Linear(F_, D, bias=b)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x, lean: bool = False):  # (B, T, D) -> (B, T, F) -> (B, T, D)
        # act(gate) * up keeping gate and up only: act(gate) is recomputed in backward (ops.gated_act)
        g, u = self.gate_proj(x), self.up_proj(x)
        h = gated_act(g, u, self.gelu)  # (B, T, F)
        if not lean:
            return self.down_proj(h)
        g, u = g.detach(), u.detach()
        with rebuilt_in_backward(h, lambda: gated_act_plain(g, u, self.gelu)):  # down_proj's LoRA input
            return self.down_proj(h)


def keep_dequantized_weights(block: nn.Module, keep: bool) -> None:
    """Turn weight reuse on or off for every quantized linear in `block` (NF4Linear.keep_dequantized;
    found by the attribute: models/ does not import the quantizer)."""
    for m in block.modules():
        if hasattr(m, "keep_dequantized"):
            m.keep_dequantized = keep


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.traits.sandwich_norms
        self.sliding = cfg.layer_types[layer_idx] == SLIDING
        D, eps, offset = cfg.hidden_size, cfg.rms_norm_eps, cfg.traits.norm_offset
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(D, eps, offset)
        self.post_attention_layernorm = RMSNorm(D, eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(D, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(D, eps, offset)

    def forward(self, x, cos, sin, mask, cache=None, lean: bool = False):
        """lean: the normed inputs of attention and MLP and the MLP's act(gate) * up are rebuilt in
        backward from what the norms and the activation keep anyway (ops.rebuilt_in_backward), not
        kept; for blocks that keep their activations (a recomputed block keeps its input only)."""
        a = self._normed(self.input_layernorm, x, lean, lambda n: self.self_attn(n, cos, sin, mask, cache))
        pre_mlp = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        if self.sandwich:
            h = x + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self._normed(pre_mlp, h, lean, lambda n: self.mlp(n, lean)))
        # Without sandwich norms transformers names the pre-MLP norm `post_attention_layernorm`.
        h = x + a
        return h + self._normed(pre_mlp, h, lean, lambda n: self.mlp(n, lean))

    @staticmethod
    def _normed(norm, x, lean: bool, body):
        """body(norm(x)); with lean, norm(x) is not kept for backward but rebuilt from x."""
        n = norm(x)
        if not lean:
            return body(n)
        xd = x.detach()
        with rebuilt_in_backward(n, lambda: norm(xd)):
            return body(n)


class Decoder(nn.Module):
    """transformers' `model` submodule: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.traits.norm_offset)


def build_mask(q_slots, key_valid, segment_q, segment_k, window, prefix_len=None, positions=None):
    """Boolean attention mask (B, 1, T, S), True where query may attend to key.

    q_slots (T,) are the queries' slot indices in the key sequence (past length + t). Combined:
      causal        key slot <= query slot                          (always)
      sliding       query slot - key slot < window                  (sliding layers only)
      padding       key_valid[b, s] (attention_mask, incl. cached)  (when a mask/cache is given)
      segments      segment_k[b, s] == segment_q[b, t]              (when segment_ids is given)
      or a prefix   key slot < prefix_len[b]                        (when prefix_len is given)
    prefix_len (B,), with segment_ids and positions (B, T), no cache: the first prefix_len[b] keys of
    a row are visible to every later query of the row whatever its segment (data/pairs.py's
    SharedPairs: a prompt shared by two answers), and the window counts positions, not slots (the
    rejected answer's slots lie beyond the chosen one's, its positions right after the prompt).
    Each query may always attend to its own slot, so a padding query's row is never empty
    (SDPA returns NaN for an all-False row); those rows are garbage and ignored by callers.
    """
    S = key_valid.shape[1]
    k_slots = torch.arange(S, device=q_slots.device)
    allowed = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    if window is not None and prefix_len is None:
        allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)
    allowed = allowed[None] & key_valid[:, None, :]  # (B, T, S)
    if window is not None and prefix_len is not None:
        allowed = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    if segment_q is not None:
        same = segment_q[:, :, None] == segment_k[:, None, :]  # (B, T, S)
        if prefix_len is not None:
            same = same | (k_slots[None, None, :] < prefix_len[:, None, None])
        allowed = allowed & same
    allowed = allowed | (k_slots[None, :] == q_slots[:, None])[None]
    return allowed[:, None]  # (B, 1, T, S)


def causal_is_exact(valid, segment_ids) -> bool:
    """Whether plain causal attention gives every real token what build_mask's mask would.

    True when each row's real tokens are a prefix (no padding, or right padding) and all of them
    share one segment id (unpacked batches): a real query then attends to exactly the earlier real
    tokens either way. Padding queries differ, and their outputs are ignored by every caller.
    Costs one device-to-host sync.
    """
    if valid.shape[1] < 2:
        return True
    ok = valid[:, 1:] <= valid[:, :-1]  # (B, T-1): once a row turns to padding it stays padding
    if segment_ids is not None:  # a real token continues its predecessor's segment
        ok = ok & (~valid[:, 1:] | (segment_ids[:, 1:] == segment_ids[:, :-1]))
    return bool(ok.all())


def default_positions(attention_mask, segment_ids, past_positions=None):
    """Position ids (B, T) so that padded or packed rows equal each sequence run alone.

    Left padding: cumsum(mask) - 1 (real tokens count from 0; padding gets 0). Packed segments:
    the index within the segment. With a cache, counting continues from `past_positions` (B,).
    """
    B, T = attention_mask.shape
    if segment_ids is not None:
        idx = torch.arange(T, device=segment_ids.device).expand(B, T)
        new_seg = torch.ones_like(segment_ids, dtype=torch.bool)
        new_seg[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        start = torch.cummax(torch.where(new_seg, idx, torch.zeros_like(idx)), dim=1).values
        return idx - start  # (B, T)
    pos = attention_mask.long().cumsum(-1) - 1
    if past_positions is not None:
        pos = pos + past_positions[:, None]
    return pos.clamp(min=0)


class Transformer(nn.Module):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM / Gemma3ForCausalLM
    with the same parameter names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = config.head_dim
        self.register_buffer("inv_freq_global", rope_inv_freq(hd, config.rope_theta, config.rope_scaling), False)
        self.register_buffer("inv_freq_local", rope_inv_freq(hd, config.rope_local_theta, None), False)
        self.gradient_checkpointing = False
        self.checkpoint_blocks = 0  # the first checkpoint_blocks blocks recompute (see set_gradient_checkpointing)
        self.selective_blocks = 0  # the next selective_blocks blocks recompute selectively
        self.reuse_blocks = 0  # the last reuse_blocks blocks keep their dequantized weights (set_weight_reuse)
        self.lean_saves = True  # blocks that keep their activations rebuild normed inputs in backward (Block.forward)

    def _apply(self, fn, recurse=True):
        """nn.Module's .to() / .cuda() / .bfloat16(), with the RoPE frequencies kept in float32, only moved: a
        cast to bf16 would round them to 8 significant bits (1/sqrt(10) = 0.316228 to 0.316406), turning
        the angle p f at position p by up to p f 2^-8 (0.009 rad at p = 53), where transformers and every
        exported file compute f from the config in float32."""
        freqs = {name: getattr(self, name) for name in ("inv_freq_global", "inv_freq_local")}
        super()._apply(fn, recurse)
        for name, f in freqs.items():
            setattr(self, name, f.to(getattr(self, name).device))
        return self

    def tie_weights(self):
        """Re-tie lm_head to embed_tokens (the loader calls this after replacing parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_gradient_checkpointing(self, enabled: bool | int = True, selective: bool | int = 0):
        """Recompute block activations in backward (torch.utils.checkpoint, non-reentrant).

        enabled: full recompute (each such block keeps only its input) on every block (True), none
        (False), or the first k blocks. selective: selective recompute (models/recompute.py: the
        matmul outputs are kept, the elementwise ops rerun) on the next k blocks, or on every block
        that `enabled` leaves (True). The memory planner picks the two counts; the rest keep all."""
        L = self.config.num_hidden_layers

        def count(v, room):
            return room if v is True else 0 if v is False else max(0, min(room, int(v)))

        full = count(enabled, L)
        self.checkpoint_blocks, self.selective_blocks = full, count(selective, L - full)
        self.gradient_checkpointing = full + self.selective_blocks > 0

    def set_weight_reuse(self, blocks: int) -> None:
        """The last `blocks` blocks keep each quantized linear's dequantized weight (keep_dequantized,
        minilora/quant/linear.py) for the backward and from one step to the next, so they dequantize
        once per run; the rest dequantize in every forward, recompute and backward. The memory planner
        picks the count."""
        L = self.config.num_hidden_layers
        self.reuse_blocks = max(0, min(L, int(blocks)))
        for i, layer in enumerate(self.model.layers):
            keep_dequantized_weights(layer, i >= L - self.reuse_blocks)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final-normed hidden -> (B, T, V) logits, with Gemma's final soft-capping."""
        logits = self.lm_head(h)  # (B, T, V)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        segment_ids=None,
        cache=None,
        return_hidden=False,
        adapter_ids=None,
        prefix_len=None,
    ):
        """input_ids (B, T) -> logits (B, T, V), or final-normed hidden states (B, T, D).

        attention_mask (B, T): 1 real, 0 padding (with a cache: the mask of the new tokens; the
        cache remembers earlier ones). segment_ids (B, T): packed sequences, attention stays within
        a segment. position_ids default to `default_positions` (padded/packed rows equal unpacked).
        adapter_ids (B,): with several LoRA adapters loaded, the one each row uses (-1: the base alone).
        prefix_len (B,), with segment_ids and position_ids: each row's first prefix_len tokens are
        seen by all its segments (a prompt shared by two answers: build_mask).
        """
        check_inputs(
            input_ids,
            self.config.vocab_size,
            attention_mask=attention_mask,
            position_ids=position_ids,
            segment_ids=segment_ids,
        )
        if prefix_len is not None and (cache is not None or segment_ids is None or position_ids is None):
            raise ValueError("prefix_len (a shared prompt) needs segment_ids and position_ids, and no KV cache.")
        with adapters_per_row(adapter_ids, input_ids.shape[0], input_ids.device):
            return self._forward(input_ids, position_ids, attention_mask, segment_ids, cache, return_hidden, prefix_len)

    def _forward(self, input_ids, position_ids, attention_mask, segment_ids, cache, return_hidden, prefix_len=None):
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = default_positions(valid, segment_ids, None if cache is None else cache.next_positions)
        key_valid = valid if cache is None else cache.append_mask(valid, position_ids)  # (B, S)
        if cache is not None and segment_ids is not None:
            raise ValueError(
                "segment_ids (packed sequences) are for training; they cannot be combined with a KV cache."
            )
        q_slots = torch.arange(past, past + T, device=dev)  # (T,)
        causal = cache is None and prefix_len is None and causal_is_exact(valid, segment_ids)

        emb = self.model.embed_tokens(input_ids)  # (B, T, D)
        if cfg.traits.embedding_scale:
            # sqrt(D) rounded to the weight dtype first (bf16: sqrt(1152)=33.94 -> 34.0), as in the reference.
            emb = emb * torch.tensor(cfg.hidden_size**0.5, dtype=emb.dtype, device=dev)
        x = emb
        # Additive masks, one per layer kind: SDPA would turn a boolean mask into this form in every
        # layer and keep every copy for backward; built once here, the layers of a kind share it.
        masks = {
            kind: None
            if causal and (kind == FULL or T <= cfg.sliding_window)
            else additive_mask(
                build_mask(
                    q_slots,
                    key_valid,
                    segment_ids,
                    segment_ids,
                    cfg.sliding_window if kind == SLIDING else None,
                    prefix_len,
                    position_ids,
                ),
                x.dtype,
            )
            for kind in set(cfg.layer_types)
        }
        # cos, sin per layer kind in use. Sliding layers rotate with their own unscaled base where the
        # family says so (local_rope); elsewhere both kinds use the global table, scaling included.
        local = self.inv_freq_local if cfg.traits.local_rope else self.inv_freq_global
        inv_freq = {FULL: self.inv_freq_global, SLIDING: local}
        rope = {kind: rope_cos_sin(inv_freq[kind], position_ids, x.dtype) for kind in set(cfg.layer_types)}
        # adapter_ids live in a context variable that checkpoint's recompute (during backward) would not see
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None and adapter_rows() is None
        for i, (layer, kind) in enumerate(zip(self.model.layers, cfg.layer_types)):
            cos, sin = rope[kind]
            if use_ckpt and i < self.checkpoint_blocks:
                x = checkpoint(layer, x, cos, sin, masks[kind], use_reentrant=False)
            elif use_ckpt and i < self.checkpoint_blocks + self.selective_blocks:
                x = checkpoint(layer, x, cos, sin, masks[kind], use_reentrant=False, context_fn=selective_context)
            else:
                x = layer(x, cos, sin, masks[kind], cache, lean=self.lean_saves and torch.is_grad_enabled())
        if cache is not None:
            cache.advance(T)
        h = self.model.norm(x)  # (B, T, D)
        return h if return_hidden else self.logits_from_hidden(h)
