"""Export: merge a LoRA adapter into its base and write it for serving, then check what was written.

    W_merged = W0 + s * B @ A          B (M, r), A (r, K), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

computed in float32 per weight and cast once to the export dtype. W0 is the weight the adapter was
trained against: for a QLoRA run the dequantized NF4 weight, so the export is the very model that
eval.py scored (`--merge-base original` merges into the checkpoint's own weights instead).

Formats, each in its own module:
  hf         a Hugging Face checkpoint folder (minilora.export.hf_checkpoint), config.json from
             minilora.models.hf_config.to_hf_config; with quantize_4bit the block linears in
             bitsandbytes' NF4 layout (minilora.export.bnb): transformers and vLLM load either as is
  gguf       one GGUF file for llama.cpp / Ollama (minilora.export.gguf, minilora.export.gguf_vocab)
  gguf-lora  the adapter alone as a GGUF LoRA for llama.cpp's --lora
Then minilora.export.readback reloads the export through an independent reader and compares logits.
Every file or folder is written into a temporary folder beside its target, read back there, and
renamed into place only when that passed (minilora.export.target): a failed, stopped or interrupted
export leaves --out as it was.
"""

from __future__ import annotations

import os

import torch

from minilora.dtypes import DTYPE_NAMES, DTYPES, run_dtype
from minilora.export.errors import ExportError
from minilora.models.config import ModelConfig
from minilora.models.hf_config import to_hf_config
from minilora.models.loader import is_block_linear, source_checkpoint


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


# ------------------------------------------------------------------------------- merging
def merge_to_dense(model, dtype: torch.dtype):
    """Replace every LoRALinear by an nn.Linear holding W0 + s B A (DoRA: its merged weight), and every
    NF4Linear by its dequantized weight; the sum is formed in float32 and cast once to `dtype`."""
    import torch.nn as nn

    from minilora.lora.layers import LoRALinear, base_weight
    from minilora.models.loader import set_module
    from minilora.quant.linear import NF4Linear

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
                w = mod.merged_weight(w)  # (M, K): W0 + s (M, r) @ (r, K), or DoRA's
            lin = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=dtype)
            lin.weight.copy_(w)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        lin.requires_grad_(False)
        set_module(model, name, lin)
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


FORMATS = ("hf", "gguf", "gguf-lora")


def _base_config(name: str) -> ModelConfig:
    """The base model's ModelConfig without loading weights (for the adapter-only GGUF)."""
    from minilora.models.hub import resolve_checkpoint
    from minilora.models.loader import read_config
    from minilora.models.presets import PRESETS

    if name in PRESETS:  # a preset mirrors its hub config.json, so no download is needed
        return ModelConfig.from_name(name)
    return read_config(resolve_checkpoint(name, allow_patterns=["*.json"]), name)


def export_adapter(
    adapter: str,
    out: str,
    dtype: str = "bfloat16",
    quantize_4bit: bool = False,
    overwrite: bool = False,
    model_name: str | None = None,
    merge_base: str = "auto",
    max_shard_bytes: int = 5 * 2**30,
    fmt: str = "hf",
    gguf_type: str = "f16",
    validate: bool = True,
    log=print,
    gate_examples: int = 40,
    max_quality_drop: float = 5.0,
) -> str:
    """Merge the adapter of a run into its base and write `out`: a Hugging Face checkpoint folder
    (fmt="hf", optionally bitsandbytes NF4), one GGUF file (fmt="gguf", `gguf_type` one of gguf.GGUF_TYPES),
    or the adapter alone as a GGUF LoRA (fmt="gguf-lora"). Unless validate=False it is read back
    (minilora.export.readback: ValidationError when it does not reproduce the merged model) and put
    through the task gate (minilora.export.gate: up to `gate_examples` of the run's eval data;
    QualityGateError when the export scores more than `max_quality_drop` points below the merged model).
    Both run on the export in a temporary folder beside `out`, which becomes `out` only when they pass
    (minilora.export.target: what --out may be, and what overwrite may replace). Returns `out`, absolute.

    merge_base: "dequantized" merges into the dequantized NF4 weights the QLoRA run trained against
    (the model eval.py scored), "original" into the checkpoint's weights, "auto" picks by the run's
    --quantize (no run config: original).
    """
    from minilora.export.gguf import write_modelfile
    from minilora.export.target import check_target, staged
    from minilora.lora.adapter_files import read_adapter_config
    from minilora.train.rundir import find_run

    _check_request(fmt, dtype, gguf_type, merge_base, quantize_4bit)
    adapter_dir, run_dir, run_config = find_run(adapter)
    out = check_target(out, fmt, overwrite, (run_dir, adapter_dir))
    name = model_name or run_config.get("model") or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{adapter_dir} does not say which base model it was trained on; pass --model.")
    if fmt == "gguf-lora":
        return _export_gguf_lora(adapter_dir, out, name, overwrite, validate, log)
    if merge_base == "auto":
        merge_base = "dequantized" if run_config.get("quantize", "none") == "nf4" else "original"
    out_dtype = DTYPES[dtype] if fmt == "hf" else torch.float32  # GGUF: merge in float32, round once on writing
    model, tok = _adapted_model(name, adapter_dir, run_config, merge_base, out_dtype, fmt)
    what = {"hf": dtype + (" + bitsandbytes NF4" if quantize_4bit else ""), "gguf": f"GGUF {gguf_type}"}[fmt]
    log(f"merging {adapter_dir} into {name} ({merge_base} base weights), writing {what}")
    merge_to_dense(model, out_dtype)
    tensors = dense_tensors(model, out_dtype)
    config = to_hf_config(model.config, tok, out_dtype if fmt == "hf" else torch.float32)
    src = base_dir(name)
    if fmt == "hf" and model.config.source_prefix != "model.":
        # A multimodal source stays multimodal: its architecture and config.json, our merged text
        # tower under its names, the vision tower and projector copied unchanged.
        if quantize_4bit:
            raise ExportError(f"--quantize-4bit is not supported for the multimodal {name}; export without it.")
        tensors, config = source_checkpoint(model.config, tensors, src)
        config["torch_dtype"] = DTYPE_NAMES[out_dtype]
    with staged(out, fmt == "hf", overwrite) as path:
        if fmt == "hf":
            hf_config, kind = _write_hf(path, tensors, config, src, quantize_4bit, out_dtype, max_shard_bytes)
        else:
            chat_template = _write_gguf(path, model, tok, tensors, config, src, gguf_type, name)
            hf_config, kind = config, "gguf"
        del tensors
        if validate:
            args = (run_config, gguf_type, log, gate_examples, max_quality_drop)
            validate_export(path, kind, model, tok, hf_config, *args, shown=out)
    if fmt == "gguf":
        write_modelfile(out, chat_template, log)  # after the GGUF is in place: it names that file
    return out


def _check_request(fmt: str, dtype: str, gguf_type: str, merge_base: str, quantize_4bit: bool) -> None:
    """Refuse, in one sentence and before any work, settings that cannot be exported together."""
    from minilora.export.gguf import GGUF_TYPES

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt} is not supported; use one of {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type} is not supported; use one of {', '.join(GGUF_TYPES)}.")
    if merge_base not in ("auto", "dequantized", "original"):
        raise ExportError(f"--merge-base {merge_base} is not supported; use auto, dequantized or original.")
    if quantize_4bit and fmt != "hf":
        raise ExportError(
            "--quantize-4bit writes bitsandbytes' layout, which only --format hf holds; for a "
            "4-bit GGUF pass --gguf-type q4_k_m."
        )
    if merge_base != "auto" and fmt == "gguf-lora":
        raise ExportError(
            "--merge-base chooses the weights a merged export starts from, but --format gguf-lora writes the "
            "adapter alone; drop the flag."
        )


def _adapted_model(name: str, adapter_dir: str, run_config: dict, merge_base: str, out_dtype, fmt: str):
    """(model with the adapter loaded, tokenizer): the base loaded as `merge_base` says."""
    from minilora.lora.adapter import check_adapter_fits, load_adapter
    from minilora.models.loader import load_model

    if merge_base == "dequantized":  # quantize exactly as training did: same source dtype, NF4 defaults
        model, tok = load_model(name, quantize="nf4", dtype=run_dtype(run_config))
    else:
        model, tok = load_model(name, quantize=None, dtype=out_dtype)
    if fmt == "gguf":
        from minilora.export.gguf import gguf_arch

        gguf_arch(model.config)  # refuse an unmappable model before the merge
    check_adapter_fits(model, adapter_dir, name)
    load_adapter(model, adapter_dir)
    return model, tok


def _write_hf(folder, tensors, config, src, quantize_4bit, out_dtype, max_shard_bytes) -> tuple[dict, str]:
    """Write the checkpoint into `folder`; (its config.json as the read-back loads it, kind: hf or nf4)."""
    from minilora.export.bnb import bnb_4bit_tensors, quantization_config
    from minilora.export.hf_checkpoint import generation_config, write_checkpoint_files

    hf_config = dict(config)
    if quantize_4bit:
        tensors = bnb_4bit_tensors(tensors)
        config["quantization_config"] = quantization_config(out_dtype)
    write_checkpoint_files(folder, tensors, config, src, generation_config(src, config), max_shard_bytes)
    return hf_config, "nf4" if quantize_4bit else "hf"


def _write_gguf(path, model, tok, tensors, config, src, gguf_type, name) -> str | None:
    """Write the merged model as the GGUF file `path`; returns the chat template it holds (or None)."""
    from gguf import GGML_QUANT_VERSION  # gguf_arch() has already said how to install it if missing

    from minilora.export.gguf import file_type, gguf_arch, gguf_metadata, gguf_tensors, write_gguf
    from minilora.export.gguf_vocab import vocab_metadata

    cfg = model.config
    ids = {
        "bos": config.get("bos_token_id"),
        "eos": (cfg.eos_token_ids or [config.get("eos_token_id")])[0],
        "pad": config.get("pad_token_id"),
    }
    if tok is not None:  # as llama.cpp's SpecialVocab: the tokenizer's own special tokens first, config.json after
        named = {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}
        ids.update({k: tok.token_to_id(t) for k, t in named.items() if t and tok.token_to_id(t) is not None})
    meta = {
        "general.name": os.path.basename(os.path.normpath(name)),
        **gguf_metadata(cfg),
        "general.file_type": int(file_type(gguf_type)),
    }
    if gguf_type not in ("f16", "bf16"):
        meta["general.quantization_version"] = int(GGML_QUANT_VERSION)
    vocab = vocab_metadata(src, tok, cfg.vocab_size, ids)
    write_gguf(path, gguf_arch(cfg).arch, meta, gguf_tensors(tensors, cfg, gguf_type), vocab=vocab)
    return vocab.get("tokenizer.chat_template")


def validate_export(
    path: str,
    kind: str,
    model,
    tok,
    hf_config: dict,
    run_config: dict,
    gguf_type: str = "f16",
    log=print,
    gate_examples: int = 40,
    max_quality_drop: float = 5.0,
    shown: str | None = None,
) -> None:
    """Compare the merged in-memory `model` (A) and the weights as the file should hold them (B, set in
    place: the model is spent afterwards) with transformers' reading of the file at `path`; kind is
    hf, nf4 or gguf. Raises ValidationError past minilora.export.readback.TOLERANCE, then
    QualityGateError when the export does the run's task worse than A (minilora.export.gate).
    `shown`: the path the log names (the --out a temporary export is renamed to)."""
    from minilora.export import gate as G
    from minilora.export import readback as V

    prompts, source = V.validation_prompts(run_config, tok, model.config.vocab_size)
    log(f"validating {shown or path} on {source}")
    V.reference_weights(model, lambda n, p: p)  # float32 compute, same weights
    ref_a = V.outputs(model, prompts)
    examples, template, gate_source = G.gate_examples(run_config, tok, gate_examples)
    merged_scores = G.score_merged(model, tok, examples, template) if examples else None  # before B replaces A
    if kind == "nf4":
        from minilora.export.bnb import nf4_round_trip

        dt = DTYPES[hf_config["torch_dtype"]]
        V.reference_weights(model, lambda n, p: nf4_round_trip(p.to(dt)) if is_block_linear(n) else p)
    elif kind == "gguf":
        from minilora.export.gguf import round_trip_fn

        V.reference_weights(model, round_trip_fn(model.config, gguf_type))
    ref_b = ref_a if kind == "hf" else V.outputs(model, prompts)
    if kind == "gguf":
        from minilora.export.gguf import gguf_arch

        reader_type = gguf_arch(model.config).reader_model_type  # transformers reads a Mistral GGUF as llama
        hf_config = {**hf_config, "model_type": reader_type} if reader_type else hf_config
    exported = V.reload_or_fail(kind, path, hf_config)
    got = V.outputs(exported, prompts)
    stats, label = V.compare(ref_b, got), kind if kind != "gguf" else f"gguf {gguf_type}"
    V.report(label, stats, None if kind == "hf" else V.compare(ref_a, got), log)
    V.check(path, stats)
    if examples is None:
        log(f"task gate: skipped, {gate_source}")
        return
    scores = G.score_export(exported, tok, examples, template)
    hint = G.advice(kind, gguf_type, hf_config.get("torch_dtype"))
    G.check(path, label, merged_scores, scores, gate_source, max_quality_drop, hint, log)


def _export_gguf_lora(adapter_dir, out, name, overwrite, validate, log) -> str:
    from minilora.export.gguf import gguf_arch, lora_metadata, lora_tensors, write_gguf
    from minilora.export.target import staged
    from minilora.lora.adapter_files import read_adapter_weights

    cfg = _base_config(name)
    acfg, weights = read_adapter_weights(adapter_dir)
    arch = gguf_arch(cfg).arch
    log(f"writing the adapter in {adapter_dir} as a GGUF LoRA for {arch} ({name})")
    expected = list(lora_tensors(weights, acfg, cfg))
    meta = {"general.name": os.path.basename(os.path.normpath(adapter_dir)), **lora_metadata(acfg)}
    with staged(out, False, overwrite) as path:
        write_gguf(path, arch, meta, expected, general_type="adapter")
        if validate:
            from minilora.export.readback import check_gguf_tensors

            check_gguf_tensors(path, expected, log, shown=out)
    return out
