"""Export: merge a LoRA adapter into its base and write a Hugging Face checkpoint.

Shape letters: M out_features, K in_features, r rank, n = M*K weight elements,
nb = ceil(n / blocksize) NF4 blocks, nb2 = ceil(nb / 256) second-level blocks.

    W_merged = W0 + s * B @ A          B (M, r), A (r, K), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

computed in float32 per weight and cast once to the export dtype. W0 is the weight the adapter was
trained against: for a QLoRA run the dequantized NF4 weight, so the export is the very model that
eval.py scored (`--merge-base original` merges into the checkpoint's own weights instead).

What is written (what transformers' save_pretrained writes; `from_pretrained` loads it as is):
  config.json             transformers-4.x dialect (rope_theta / rope_scaling, Gemma's
                          rope_local_base_freq) plus layer_types: read by transformers 4.50+ and 5, vLLM
  model.safetensors       transformers' tensor names; a tied lm_head is not stored; sharded with an
                          index past `max_shard_bytes`
  generation_config.json  the base's, else bos/eos/pad from the tokenizer
  tokenizer files         copied from the base (tokenizer.json, tokenizer_config.json with the chat
                          template, chat_template.jinja, special_tokens_map.json, ...)

4-bit export: bitsandbytes' serialized layout (QuantState.as_dict(packed=True)) for every block
linear `L` (embeddings, norms and lm_head stay in the export dtype, as bitsandbytes leaves them):
  L.weight                                 uint8 (ceil(n/2), 1)  NF4 codes, two per byte
  L.weight.absmax                          uint8 (nb,)    8-bit codes of the block absmax
  L.weight.quant_map                       float32 (16,)  the NF4 table
  L.weight.nested_absmax                   float32 (nb2,)
  L.weight.nested_quant_map                float32 (256,) the signed dynamic 8-bit map
  L.weight.quant_state.bitsandbytes__nf4   uint8 bytes of the JSON {quant_type, blocksize, dtype,
                                           shape, nested_blocksize, nested_dtype, nested_offset}
and `quantization_config` in config.json, so from_pretrained loads it quantized, without requantizing.
The codes come from minilora.nf4.quantize_nf4, which is bit-exact with bitsandbytes.

Every export is written into a temporary folder beside `out` and renamed into place at the end:
an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions, write_json
from minilora.models.config import FULL, SLIDING, ModelConfig
from minilora.models.loader import is_block_linear, source_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json")  # fmt: skip  (a multimodal source's processor)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_NAMES = {v: k for k, v in DTYPES.items()}


class ExportError(ValueError):
    """An export the user asked for cannot be done; the message says what to do."""


# ------------------------------------------------------------------------------- config.json
def _pattern(layer_types: list[str]) -> int | None:
    """N when every N-th layer is full attention and the rest sliding (Gemma's 4.x config key)."""
    for n in range(1, len(layer_types) + 1):
        if layer_types == [SLIDING if (i + 1) % n else FULL for i in range(len(layer_types))]:
            return n
    return None


def to_hf_config(cfg: ModelConfig, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A transformers config.json dict for `cfg` (the inverse of ModelConfig.from_hf_config).

    Token ids missing from the config (the `tiny` preset has none) come from the tokenizer.
    """
    eos = list(cfg.eos_token_ids) or (list(tokenizer.eos_ids) if tokenizer is not None else [])
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else getattr(tokenizer, "bos_id", None)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(tokenizer, "pad_id", None)
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "bos_token_id": bos, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": pad,
        "torch_dtype": _NAMES[dtype], "use_cache": True,
    }  # fmt: skip
    if cfg.family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "mlp_bias": cfg.mlp_bias, **common}  # fmt: skip
    if cfg.family == "mistral":  # one window for all layers, or none
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", **common,
                "sliding_window": cfg.sliding_window}  # fmt: skip
    if cfg.family in ("qwen2", "qwen3"):
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == SLIDING]
        arch = "Qwen2ForCausalLM" if cfg.family == "qwen2" else "Qwen3ForCausalLM"
        # transformers 4.x: the window covers layers max_window_layers.. when use_sliding_window.
        return {"architectures": [arch], "model_type": cfg.family, "hidden_act": "silu", **common,
                "use_sliding_window": bool(sliding), "sliding_window": cfg.sliding_window,
                "max_window_layers": sliding[0] if sliding else cfg.num_hidden_layers,
                "layer_types": list(cfg.layer_types)}  # fmt: skip
    out = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
           "hidden_activation": cfg.hidden_act, **common, "rope_local_base_freq": cfg.rope_local_theta,
           "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
           "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
           "attn_logit_softcapping": cfg.attn_logit_softcapping,
           "final_logit_softcapping": cfg.final_logit_softcapping}  # fmt: skip
    n = _pattern(out["layer_types"])
    if n is not None:  # transformers < 4.53 derives the layer types from this key
        out["sliding_window_pattern"] = n
    return out


def quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict:
    """The quantization_config transformers writes for a bitsandbytes NF4 model."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": _NAMES[compute_dtype], "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"], "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}  # fmt: skip


# ------------------------------------------------------------------------------- tensors
def dense_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{transformers name: tensor in `dtype`} of a dense (merged, unquantized) model."""
    tensors = {}
    for name, t in model.state_dict().items():
        if not torch.is_floating_point(t):
            raise ExportError(f"{name} is not a dense weight ({t.dtype}); merge and dequantize the model first.")
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to model.embed_tokens.weight; transformers re-ties it on load
        tensors[name] = t.detach().to("cpu", dtype).contiguous()
    return tensors


def bnb_quant_state(q, prefix: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' QuantState.as_dict(packed=True) for an NF4Tensor, keys prefixed by `prefix`.

    Written without importing bitsandbytes (not a runtime dependency); tests compare it byte for
    byte with bitsandbytes' own serialization of the same state.
    """
    from minilora.nf4 import BLOCKSIZE2
    from minilora.quant_maps import dynamic_map, nf4_code

    out = {prefix + "absmax": q.absmax, prefix + "quant_map": nf4_code("cpu")}
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _NAMES[q.dtype], "shape": list(q.shape)}
    if q.double_quant:
        out[prefix + "nested_absmax"] = q.absmax2
        out[prefix + "nested_quant_map"] = dynamic_map(True).clone()
        meta.update({"nested_blocksize": BLOCKSIZE2, "nested_dtype": "float32", "nested_offset": float(q.offset)})
    blob = json.dumps(meta).encode("utf-8")  # bitsandbytes' pack_dict_to_tensor: json.dumps -> uint8 bytes
    out[prefix + "quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def bnb_4bit_tensors(dense: dict[str, torch.Tensor], blocksize: int = 64,
                     double_quant: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """Dense tensors -> bitsandbytes' serialized 4-bit layout (block linears quantized to NF4).

    Each weight is quantized in the dtype it is stored in, exactly as minilora's loader with
    quantize="nf4" (and bitsandbytes' from_pretrained(load_in_4bit)) would quantize it.
    """
    from minilora.nf4 import quantize_nf4

    out = {}
    for name, t in dense.items():
        if not is_block_linear(name):
            out[name] = t
            continue
        q = quantize_nf4(t, blocksize=blocksize, double_quant=double_quant)
        out[name] = q.packed.reshape(-1, 1)  # (ceil(n/2), 1) uint8
        out.update(bnb_quant_state(q, name + "."))
    return out


# ------------------------------------------------------------------------------- writing
def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors, each under max_bytes (a larger tensor gets a shard alone)."""
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + n
    return shards + [cur] if cur else shards


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless overwrite (raised before any work is done)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file; pass a folder path for the checkpoint.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it.")


def write_checkpoint(out: str, tensors: dict[str, torch.Tensor], config: dict, *, tokenizer_dir: str | None = None,
                     generation_config: dict | None = None, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30) -> str:  # fmt: skip
    """Write a Hugging Face checkpoint folder atomically (temp folder + rename); returns `out`."""
    from safetensors.torch import save_file

    out = os.path.abspath(out)
    check_out_dir(out, overwrite)
    tmp = temp_dir_for(out)
    try:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})  # fmt: skip
        write_json(os.path.join(tmp, "config.json"), config)
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, fname)):
                    shutil.copyfile(os.path.join(tokenizer_dir, fname), os.path.join(tmp, fname))
        if generation_config is not None:
            write_json(os.path.join(tmp, "generation_config.json"), generation_config)
        usual_permissions(tmp)
        swap_into_place(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


def generation_config(base_dir: str | None, hf_config: dict) -> dict:
    """The base checkpoint's generation_config.json, else one built from config.json's token ids."""
    path = os.path.join(base_dir, "generation_config.json") if base_dir else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}


# ------------------------------------------------------------------------------- runs and adapters
def find_run(path: str) -> tuple[str, str, dict]:
    """(adapter folder, run directory, the run's TrainConfig as a dict or {}) for a run directory
    written by train.py (holding adapter/) or for an adapter folder itself."""
    path = os.path.normpath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Adapter folder {path} does not exist; pass the run directory train.py wrote "
                                "(e.g. runs/mytask) or its adapter/ folder.")  # fmt: skip
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        adapter = path
        parent = os.path.dirname(os.path.abspath(path))
        run = parent if os.path.isfile(os.path.join(parent, "config.json")) else path
    elif os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")):
        adapter, run = os.path.join(path, "adapter"), path
    else:
        raise FileNotFoundError(f"{path} holds no adapter (no adapter_config.json there or in {path}/adapter); "
                                "pass a run directory whose training finished, or a PEFT adapter folder.")  # fmt: skip
    if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
        raise FileNotFoundError(f"{adapter} has adapter_config.json but no adapter_model.safetensors; the "
                                "adapter was not fully written, so train again or copy the weights file.")  # fmt: skip
    run_config = {}
    cfg_path = os.path.join(run, "config.json")
    if run != adapter and os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            run_config = json.load(f)
    return adapter, run, run_config


def adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); save the adapter again.") from None


def check_adapter_fits(model, adapter_dir: str, model_name: str) -> None:
    """Raise one sentence when the adapter's LoRA shapes do not fit `model` (an adapter for another base).

    lora_A (r, K) must match the module's in_features K and lora_B (M, r) its out_features M.
    """
    from safetensors import safe_open

    from minilora.adapter import module_path

    trained_on = adapter_config(adapter_dir).get("base_model_name_or_path") or "another model"
    prefix = "base_model.model."
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            for part, dim, attr in ((".lora_A.weight", 1, "in_features"), (".lora_B.weight", 0, "out_features")):
                if not key.endswith(part):
                    continue
                path = key[len(prefix) :] if key.startswith(prefix) else key
                path = module_path(model, path[: -len(part)])
                want = f.get_slice(key).get_shape()[dim]
                try:
                    have = getattr(model.get_submodule(path), attr, None)
                except AttributeError:
                    have = None
                if have != want:
                    what = f"has no {path}" if have is None else f"has {attr} {have} in {path}"
                    raise ValueError(
                        f"The adapter in {adapter_dir} was trained on {trained_on!r} and does not fit {model_name!r} "
                        f"(the adapter expects {attr} {want} in {path}, the model {what}); pass the --model it "
                        "was trained on."
                    )


def merge_to_dense(model, dtype: torch.dtype):
    """Replace every LoRALinear by an nn.Linear holding W0 + s B A (DoRA: its merged weight), and every
    NF4Linear by its dequantized weight; the sum is formed in float32 and cast once to `dtype`."""
    import torch.nn as nn

    from minilora.dora import merged_dora_weight
    from minilora.lora import LoRALinear, base_weight
    from minilora.quant_linear import NF4Linear

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (LoRALinear, NF4Linear)) or not name:
            continue
        try:  # a module already replaced (the base inside a replaced LoRALinear) is skipped
            if model.get_submodule(name) is not mod:
                continue
        except AttributeError:
            continue
        base = mod.base if isinstance(mod, LoRALinear) else mod
        with torch.no_grad():
            w = base_weight(base, torch.float32)  # (M, K) float32, dequantized for NF4
            if isinstance(mod, LoRALinear) and not mod.merged:
                delta = mod.delta_weight()  # (M, K) = s * (M, r) @ (r, K)
                w = merged_dora_weight(w, delta, mod.lora_magnitude_vector) if mod.use_dora else w + delta
            lin = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=dtype)
            lin.weight.copy_(w)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        lin.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    for p in model.parameters():  # embeddings and norms follow the export dtype too
        p.data = p.data.to(dtype)
    model.tie_weights()
    return model


def base_dir(model_name: str) -> str | None:
    """The folder holding the base's tokenizer and generation config (the bundled tokenizer for `tiny`)."""
    from minilora.models import loader
    from minilora.models.hub import resolve_checkpoint

    if model_name == "tiny":
        return loader._EXAMPLES_TOKENIZER if os.path.isdir(loader._EXAMPLES_TOKENIZER) else None
    return resolve_checkpoint(model_name)


def run_dtype(run_config: dict) -> torch.dtype:
    """The dtype the run loaded its base in (train.py: auto = bf16 on a GPU, float32 on the CPU)."""
    name = run_config.get("dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def export_adapter(adapter: str, out: str, dtype: str = "bfloat16", quantize_4bit: bool = False,
                   overwrite: bool = False, model_name: str | None = None, merge_base: str = "auto",
                   max_shard_bytes: int = 5 * 2**30, log=print) -> str:  # fmt: skip
    """Merge the adapter of a run into its base and write a Hugging Face checkpoint to `out`.

    merge_base: "dequantized" merges into the dequantized NF4 weights the QLoRA run trained against
    (the model eval.py scored), "original" into the checkpoint's weights, "auto" picks by the run's
    --quantize (no run config: original).
    """
    from minilora.adapter import load_adapter
    from minilora.models.loader import load_model

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    if merge_base not in ("auto", "dequantized", "original"):
        raise ExportError(f"--merge-base {merge_base} is not supported; use auto, dequantized or original.")
    out_dtype = DTYPES[dtype]
    adapter_dir, _, run_config = find_run(adapter)
    check_out_dir(os.path.abspath(out), overwrite)
    name = model_name or run_config.get("model") or adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{adapter_dir} does not say which base model it was trained on; pass --model.")
    if merge_base == "auto":
        merge_base = "dequantized" if run_config.get("quantize", "none") == "nf4" else "original"
    if merge_base == "dequantized":  # quantize exactly as training did: same source dtype, NF4 defaults
        model, tok = load_model(name, quantize="nf4", dtype=run_dtype(run_config))
    else:
        model, tok = load_model(name, quantize=None, dtype=out_dtype)
    check_adapter_fits(model, adapter_dir, name)
    load_adapter(model, adapter_dir)
    log(f"merging {adapter_dir} into {name} ({merge_base} base weights), writing {dtype}"
        + (" + bitsandbytes NF4" if quantize_4bit else ""))  # fmt: skip
    merge_to_dense(model, out_dtype)
    tensors = dense_tensors(model, out_dtype)
    config = to_hf_config(model.config, tok, out_dtype)
    src = base_dir(name)
    if model.config.source_prefix != "model.":
        # A multimodal source stays multimodal: its architecture and config.json, our merged text
        # tower under its names, the vision tower and projector copied unchanged.
        if quantize_4bit:
            raise ExportError(f"--quantize-4bit is not supported for the multimodal {name}; export without it.")
        tensors, config = source_checkpoint(model.config, tensors, src)
        config["torch_dtype"] = _NAMES[out_dtype]
    if quantize_4bit:
        tensors = bnb_4bit_tensors(tensors)
        config["quantization_config"] = quantization_config(out_dtype)
    return write_checkpoint(out, tensors, config, tokenizer_dir=src, generation_config=generation_config(src, config),
                            overwrite=overwrite, max_shard_bytes=max_shard_bytes)  # fmt: skip
