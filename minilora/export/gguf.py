"""GGUF export for llama.cpp and Ollama: one file holding the merged model, its metadata and tokenizer.

Written with llama.cpp's own Python package `gguf` (GGUFWriter, its constants and tensor-name maps,
its Q8_0 / Q4_0 quantizers), laid out as llama.cpp's converter (convert_hf_to_gguf.py) lays out the
same checkpoint, so llama.cpp, Ollama and transformers' GGUF loader read it as they read theirs.

What the converter does per architecture, and so what ARCHS below says per ModelConfig.family (the
arch name, q/k row order and norm offset from the family's entry in models/config.py's FAMILIES):
- tensor names: gguf's TensorNameMap (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight);
  a tied lm_head is not written (no output.weight = tied);
- llama (and Mistral, which llama.cpp runs as llama): q_proj / k_proj rows are reordered per head,
  W.reshape(H, 2, hd/2, K).swapaxes(1, 2), because llama.cpp's rope pairs adjacent dimensions
  (2i, 2i+1) where transformers pairs i with i + hd/2; llama3 rope scaling becomes a rope_freqs
  tensor of per-frequency factors;
- gemma3: every `*norm.weight` is stored as 1 + w (Gemma's RMSNorm scales by 1 + w; llama.cpp's by w).
  llama.cpp fixes what the file does not say: sliding layers use rope base 10000 and every 6th layer
  is global; the softmax scale is hd**-0.5 (27B: (D/H)**-0.5); a config that differs is refused;
- 1-D tensors (norms, biases, rope factors) stay float32, as the converter keeps them.

Tensor types per --gguf-type (Q8_0: 32-value blocks, one float16 scale d = max|w|/127 per block,
w ~ d * round(w/d); Q4_0: 32-value blocks, d = w_absmax_signed / -8, w ~ d * (q - 8), q in 0..15):
  f16 / bf16   every 2-D weight in that type
  q8_0         every 2-D weight Q8_0
  q4_0, q4_k_m, q5_k_m, q6_k   llama-quantize's recipes: Q4_0 / Q4_K / Q5_K / Q6_K with Q6_K for
               output, tied embeddings and (the _M recipes) some layers' attn_v / ffn_down, and llama.cpp's
               fallbacks where a row length is not a multiple of 256 (minilora.export.gguf_recipes); the
               K-quant and Q5_0 / Q5_1 blocks are written by minilora.export.kquants / q5_quants, not by gguf
A row length that is not a multiple of 32 cannot be blocked: that tensor falls back to F16, as the
converter does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from minilora.export.errors import ExportError
from minilora.export.gguf_recipes import RECIPES, is_llm_70b, our_writer, recipe_type
from minilora.export.target import check_export_file
from minilora.fileio import write_file_atomic, write_text_atomic
from minilora.models.config import FAMILIES, SLIDING, ModelConfig, every_nth_full

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs llama.cpp's `gguf` package; pip install 'minilora[gguf]'.") from None
    return gguf


# ------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter writes one model family (facts from convert_hf_to_gguf.py)."""

    arch: str  # gguf's MODEL_ARCH name: general.architecture and the metadata key prefix
    permute_qk: bool = False  # LlamaModel.undo_permute: q/k rows reordered for llama.cpp's rope
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma: 1, its RMSNorm scales by 1 + w)
    write_vocab_size: bool = False  # LlamaModel writes {arch}.vocab_size and rope.dimension_count
    reader_model_type: str | None = None  # the transformers model_type its GGUF loads as, when not the family's
    checks: tuple = field(default=())  # functions cfg -> problem sentence or None


def _gemma3_fixed(cfg: ModelConfig) -> str | None:
    """llama.cpp's Gemma 3 hard-codes what the converter does not write (llama-model.cpp)."""
    n_embd_head = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 62 else cfg.head_dim
    if cfg.attn_logit_softcapping is not None:
        return "attention logit soft-capping, which llama.cpp's Gemma 3 does not implement"
    if cfg.rope_local_theta != 10000.0:
        return f"a sliding-layer rope base of {cfg.rope_local_theta:g} (llama.cpp fixes 10000)"
    if list(cfg.layer_types) != every_nth_full(cfg.num_hidden_layers, 6):
        return "a sliding/global layer pattern other than every 6th layer global (llama.cpp fixes that pattern)"
    if not math.isclose(cfg.attn_scale, n_embd_head**-0.5, rel_tol=1e-6):
        return f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g} (llama.cpp uses {n_embd_head})"
    return None


# What only llama.cpp's converter (and transformers' reader of its files) decides per family. The
# arch name, the q/k row order and the norm offset come from the family's FAMILIES entry.
_CONVERTER_ONLY = {
    "llama": dict(write_vocab_size=True),
    "mistral": dict(write_vocab_size=True, reader_model_type="llama"),  # converted by LlamaModel
    "gemma3": dict(checks=(_gemma3_fixed,)),
}

ARCHS = {  # ModelConfig.family -> its GGUF layout
    name: GGUFArch(f.gguf_arch, f.gguf_permute_qk, f.norm_offset, **_CONVERTER_ONLY.get(name, {}))
    for name, f in FAMILIES.items()
    if f.gguf_arch is not None
}


def gguf_arch(cfg: ModelConfig) -> GGUFArch:
    """The GGUF layout for cfg's family; raises one sentence for a family or setting llama.cpp cannot run."""
    spec = ARCHS.get(cfg.family)
    if spec is None:
        raise ExportError(
            f"Model family {cfg.family!r} has no GGUF mapping (mapped: {', '.join(sorted(ARCHS))}); "
            "export --format hf instead."
        )
    for check in spec.checks:
        problem = check(cfg)
        if problem:
            raise ExportError(
                f"This {cfg.family} model has {problem}, so llama.cpp would run it differently; "
                "export --format hf instead."
            )
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3") or (kind == "llama3" and spec.arch != "llama"):
        raise ExportError(f"RoPE scaling {kind!r} on {cfg.family} has no GGUF form here; export --format hf instead.")
    return spec


# ------------------------------------------------------------------------------- metadata
def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float | str]:
    """{key: value} of the model metadata llama.cpp's converter writes for cfg (keys from gguf.Keys)."""
    spec, k = gguf_arch(cfg), _gguf().Keys
    a = spec.arch
    out = {
        k.LLM.CONTEXT_LENGTH.format(arch=a): cfg.max_position_embeddings,
        k.LLM.EMBEDDING_LENGTH.format(arch=a): cfg.hidden_size,
        k.LLM.FEED_FORWARD_LENGTH.format(arch=a): cfg.intermediate_size,
        k.LLM.BLOCK_COUNT.format(arch=a): cfg.num_hidden_layers,
        k.Attention.HEAD_COUNT.format(arch=a): cfg.num_attention_heads,
        k.Attention.HEAD_COUNT_KV.format(arch=a): cfg.num_key_value_heads,
        k.Attention.KEY_LENGTH.format(arch=a): cfg.head_dim,
        k.Attention.VALUE_LENGTH.format(arch=a): cfg.head_dim,
        k.Attention.LAYERNORM_RMS_EPS.format(arch=a): float(cfg.rms_norm_eps),
        k.Rope.FREQ_BASE.format(arch=a): float(cfg.rope_theta),
    }
    if spec.write_vocab_size:
        out[k.LLM.VOCAB_SIZE.format(arch=a)] = cfg.vocab_size
        out[k.Rope.DIMENSION_COUNT.format(arch=a)] = cfg.head_dim
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        out[k.Rope.SCALING_TYPE.format(arch=a)] = "linear"
        out[k.Rope.SCALING_FACTOR.format(arch=a)] = float(scaling["factor"])
    if cfg.final_logit_softcapping:
        out[k.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a)] = float(cfg.final_logit_softcapping)
    if SLIDING in cfg.layer_types:
        out[k.Attention.SLIDING_WINDOW.format(arch=a)] = cfg.sliding_window
    return out


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """(hd/2,) float32 per-frequency divisors llama.cpp applies for llama3 rope scaling (rope_freqs).

    For f_i = theta^(-2i/hd), wavelength l_i = 2 pi / f_i: factor 1 when l_i < L/high, `factor` when
    l_i > L/low, else 1 / ((1 - s)/factor + s) with s = (L/l_i - low) / (high - low), L the original
    context length.
    """
    s = cfg.rope_scaling
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ------------------------------------------------------------------------------- tensors
def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a q/k weight (H*hd, K) or bias (H*hd,): within each head, rows
    [0..hd/2) and [hd/2..hd) interleave, so transformers' pair (i, i + hd/2) becomes (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], gguf_type: str, cfg: ModelConfig | None = None):
    """The GGML type a tensor is stored in for --gguf-type (the table in the module docstring); the
    K-quant recipes need the model's cfg (layer count, tied embeddings)."""
    T = _gguf().GGMLQuantizationType
    if gguf_type in RECIPES:
        n = cfg.num_hidden_layers
        big = is_llm_70b(gguf_arch(cfg).arch, n, cfg.num_attention_heads, cfg.num_key_value_heads)
        return getattr(T, recipe_type(gguf_name, shape, gguf_type, n, not cfg.tie_word_embeddings, big))
    if len(shape) <= 1:
        return T.F32
    want = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[gguf_type]
    if want == T.Q8_0 and shape[-1] % 32:
        return T.F16  # rows cannot be cut into 32-value blocks: the converter's fallback
    return want


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """float tensor -> the bytes gguf stores for qtype (ours for K-quants and Q5_0 / Q5_1, else gguf's)."""
    data, ours = t.detach().to("cpu", torch.float32).numpy(), our_writer(qtype.name)
    return ours(data) if ours else _gguf().quants.quantize(data, qtype)


def round_trip(t: torch.Tensor, qtype, shift: float = 0.0) -> torch.Tensor:
    """What a GGUF reader recovers for t: dequantize(quantize(t + shift)) - shift, in float32."""
    g = _gguf()
    data = encode_tensor(t.float() + shift, qtype)
    back = torch.from_numpy(np.ascontiguousarray(g.quants.dequantize(data, qtype))).reshape(t.shape)
    return back - shift if shift else back


def gguf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, gguf_type: str):
    """Yield (gguf name, stored data, qtype) for transformers-named dense tensors (dense_tensors())."""
    g, spec = _gguf(), gguf_arch(cfg)
    names = g.get_tensor_name_map(getattr(g.MODEL_ARCH, spec.arch.upper()), cfg.num_hidden_layers)
    for name, t in tensors.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"Tensor {name} has no {spec.arch} GGUF name; export --format hf instead.")
        t = t.float()
        if spec.permute_qk and ".self_attn.q_proj." in name:
            t = permute_rows(t, cfg.num_attention_heads)
        elif spec.permute_qk and ".self_attn.k_proj." in name:
            t = permute_rows(t, cfg.num_key_value_heads)
        if spec.norm_shift and name.endswith("norm.weight"):
            t = t + spec.norm_shift
        qtype = tensor_qtype(new, tuple(t.shape), gguf_type, cfg)
        yield new, encode_tensor(t, qtype), qtype
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg).numpy(), g.GGMLQuantizationType.F32


def file_type(gguf_type: str) -> int:
    F = _gguf().LlamaFileType
    if gguf_type in RECIPES:
        return getattr(F, RECIPES[gguf_type][1])
    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[gguf_type]


# ------------------------------------------------------------------------------- writing
def _put(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


def write_gguf(
    out: str,
    arch: str,
    metadata: dict,
    tensors,
    *,
    general_type: str = "model",
    vocab: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Write one GGUF file atomically (temp file beside `out`, then rename); returns `out`.

    metadata: {key: int | float | str}; vocab: gguf_vocab.vocab_metadata(); tensors: (name, data, qtype).
    """
    g = _gguf()
    out = os.path.abspath(out)
    check_export_file(out, overwrite)

    def write(tmp: str) -> None:
        w = g.GGUFWriter(tmp, arch)
        w.add_type(general_type)
        for key, value in metadata.items():
            _put(w, key, value)
        for key, value in (vocab or {}).items():
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                _put(w, key, value)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_file_atomic(out, write)
    return out


def modelfile(gguf_path: str, chat_template: str | None) -> str:
    """An Ollama Modelfile for the GGUF (`ollama create NAME -f Modelfile`). Ollama reads the chat
    template stored in the GGUF itself, so the Modelfile only names the file."""
    lines = [f"FROM {os.path.abspath(gguf_path)}"]
    if chat_template is None:
        lines.append("# no chat template in the tokenizer: Ollama will send prompts as raw text")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str, chat_template: str | None, log=print) -> None:
    """Write NAME.Modelfile beside NAME.gguf and log the `ollama create` command, unless a Modelfile
    is there that this export would not write (a user's, or one naming another file): that one is
    kept, and the log says so and gives the FROM line this export needs instead."""
    path, stem = os.path.splitext(gguf_path)[0] + ".Modelfile", os.path.splitext(os.path.basename(gguf_path))[0]
    text = modelfile(gguf_path, chat_template)
    if os.path.lexists(path) and _read_small(path) not in (modelfile(gguf_path, None), modelfile(gguf_path, "")):
        log(
            f"note: kept {path}, which this export did not write ({_from_line(path)}); for Ollama, point a "
            f"Modelfile at this export with `FROM {os.path.abspath(gguf_path)}` and run "
            f"`ollama create {stem} -f` on it."
        )
        return
    write_text_atomic(path, text)
    log(f"Ollama: ollama create {stem} -f {path}\n{text.rstrip()}")


def _read_small(path: str, limit: int = 1 << 16) -> str | None:
    """The text of a small file, or None (a folder, unreadable, binary or large)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(limit)
    except (OSError, UnicodeDecodeError):
        return None


def _from_line(path: str) -> str:
    text = _read_small(path) or ""
    line = next((x.strip() for x in text.splitlines() if x.strip().upper().startswith("FROM ")), None)
    return f"it says `{line}`" if line else "it has no FROM line"


# ------------------------------------------------------------------------------- LoRA adapter
def lora_tensors(weights: dict[str, torch.Tensor], adapter_cfg: dict, cfg: ModelConfig):
    """(gguf name, float32 data, qtype) for a PEFT adapter, as llama.cpp's convert_lora_to_gguf lays it out.

    weights: {module path: {".lora_A.weight": (r, K), ".lora_B.weight": (M, r)}}. llama.cpp applies
    y += (alpha / r) B A x with one alpha for the file (adapter.lora.alpha) and r read from each
    lora_a, so a module whose scale s differs (rsLoRA: alpha / sqrt(r); rank_pattern / alpha_pattern)
    gets s / (alpha / r) folded into its B. Row-permuted q/k (llama): P W = (P B) A, so only B moves.
    """
    g, spec = _gguf(), gguf_arch(cfg)
    names = g.get_tensor_name_map(getattr(g.MODEL_ARCH, spec.arch.upper()), cfg.num_hidden_layers)
    alpha, F32 = float(adapter_cfg["lora_alpha"]), g.GGMLQuantizationType.F32
    for path, parts in weights.items():
        if ".lora_magnitude_vector" in parts:
            raise ExportError(
                "This is a DoRA adapter, which llama.cpp's --lora cannot apply; export the merged "
                "model (--format gguf) instead."
            )
        a, b = parts[".lora_A.weight"].float(), parts[".lora_B.weight"].float()
        r = a.shape[0]
        leaf_alpha = next((v for k, v in adapter_cfg.get("alpha_pattern", {}).items() if path.endswith(k)), alpha)
        s = leaf_alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else leaf_alpha / r
        b = b * (s / (alpha / r)) if not math.isclose(s, alpha / r, rel_tol=1e-12) else b
        if spec.permute_qk and path.endswith(".self_attn.q_proj"):
            b = permute_rows(b, cfg.num_attention_heads)
        elif spec.permute_qk and path.endswith(".self_attn.k_proj"):
            b = permute_rows(b, cfg.num_key_value_heads)
        base = names.get_name(path + ".weight", try_suffixes=(".weight",))
        if base is None:
            raise ExportError(f"LoRA module {path} has no {spec.arch} GGUF name; export --format gguf instead.")
        yield base + ".lora_a", a.contiguous().numpy(), F32
        yield base + ".lora_b", b.contiguous().numpy(), F32


def lora_metadata(adapter_cfg: dict) -> dict:
    """adapter.type and adapter.lora.alpha (general.type "adapter" is written by write_gguf)."""
    k = _gguf().Keys.Adapter
    return {k.TYPE: "lora", k.LORA_ALPHA: float(adapter_cfg["lora_alpha"])}


def round_trip_fn(cfg: ModelConfig, gguf_type: str):
    """transform(transformers name, tensor) -> the float32 tensor a GGUF reader recovers for it."""
    g, spec = _gguf(), gguf_arch(cfg)
    names = g.get_tensor_name_map(getattr(g.MODEL_ARCH, spec.arch.upper()), cfg.num_hidden_layers)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        new = names.get_name(name, try_suffixes=(".weight", ".bias")) or name
        shift = spec.norm_shift if name.endswith("norm.weight") else 0.0
        return round_trip(t, tensor_qtype(new, tuple(t.shape), gguf_type, cfg), shift)

    return transform
