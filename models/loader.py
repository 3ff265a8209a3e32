"""load_model: a preset, a Hugging Face repo id or a local folder -> (Transformer, Tokenizer).

Streaming load, so that the whole bf16 model is never resident:
  1. build the Transformer on the meta device (shapes only, no memory);
  2. for each tensor in the checkpoint (single model.safetensors, or shards listed in
     model.safetensors.index.json) map its name to ours (`our_name`, the ONE name map), read it
     memory-mapped, cast to `dtype`, move to `device` (`read_weights` + `place_tensor`, which
     minilora.parallel.distributed's FSDP loader streams through too);
  3. with quantize="nf4" every linear weight of the blocks (not embeddings, norms or lm_head) is
     quantized right away and its nn.Linear swapped for minilora.quant.linear.NF4Linear; the bf16
     copy is dropped before the next tensor is read.
Each tensor is read through its own short-lived `safe_open`: a mapping kept open for the whole
file keeps every page it touched in the process's RSS, so peak RSS would grow to the file size.
Tensors that are kept as they are (embeddings, norms, dense linears) are copied out of the mapping
so the model never depends on the file after loading.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn

from minilora import EXAMPLES
from minilora.dtypes import DTYPES

from .config import ModelConfig
from .hf_config import from_hf_config
from .hub import ModelLoadError, cached_folder, resolve_checkpoint
from .presets import PRESETS
from .transformer import Transformer

__all__ = [
    "ModelLoadError",
    "load_model",
    "our_name",
    "checkpoint_name",
    "is_block_linear",
    "build_tiny",
    "quantize_linears",
    "source_checkpoint",
    # the pieces of load_weights, also used by minilora.parallel.distributed's block-by-block loader
    "read_config",
    "read_weights",
    "place_tensor",
    "weight_files",
    "check_file_sizes",
    "check_local_weights",
    "read_tensor",
    "no_random_init",
    "set_module",
    "load_tokenizer",
    "load_config",
    "preset_name",
    "tiny_config",
    "tiny_tokenizer",
]

_EXAMPLES_TOKENIZER = os.path.join(EXAMPLES, "tokenizer")
# Gemma 3 multimodal checkpoints keep the language model under a prefix (transformers 4.x wrote
# `language_model.model.`, transformers 5 writes `model.language_model.`) next to vision tensors.
_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_SKIPPED = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def our_name(hf_name: str) -> str | None:
    """Checkpoint tensor (or module) name -> ours, or None for tensors we do not use.

    Our module names equal transformers' *ForCausalLM classes, so apart from the multimodal
    prefixes and skipped tensors the map is the identity.
    """
    if hf_name.startswith(_SKIPPED) or hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _PREFIXES:
        if hf_name.startswith(old):
            return new + hf_name[len(old) :]
    return hf_name


def checkpoint_name(name: str, source_prefix: str = "model.") -> str:
    """Our tensor or module name -> the source checkpoint's (the inverse of our_name).

    `source_prefix` is where the checkpoint keeps what we call `model.` (ModelConfig.source_prefix);
    a transformers-4 multimodal checkpoint also keeps the head under the language model.
    """
    if source_prefix == "model.":
        return name
    if name.startswith("model."):
        return source_prefix + name[len("model.") :]
    if name.startswith("lm_head.") and source_prefix == "language_model.model.":
        return "language_model." + name
    return name


def is_block_linear(name: str) -> bool:
    """Linear weights inside the blocks (our names): what the NF4 base and bitsandbytes quantize;
    embeddings, norms and lm_head stay in the model dtype."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def quantize_linears(model: nn.Module, blocksize: int = 64, double_quant: bool = True, compute_dtype=None):
    """Swap every block linear of an already materialized model for NF4Linear (post-load quantization);
    the dense base of a LoRA layer (`<linear>.base`) too, e.g. a PiSSA residual (QPiSSA)."""
    from minilora.quant.linear import NF4Linear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and is_block_linear(name.removesuffix(".base") + ".weight"):
            q = NF4Linear.from_weight(
                mod.weight.data,
                mod.bias.data if mod.bias is not None else None,
                blocksize=blocksize,
                double_quant=double_quant,
                compute_dtype=compute_dtype or mod.weight.dtype,
            )
            set_module(model, name, q)
    return model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule at dotted path `name` was ("model.layers.3.mlp.up_proj")."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def read_config(ckpt: str, name: str) -> ModelConfig:
    path = os.path.join(ckpt, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{ckpt} has no config.json; point to a Hugging Face checkpoint folder.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); download the checkpoint again.") from None
    try:
        return from_hf_config(raw, name=name)
    except (ValueError, KeyError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{path}: {msg.rstrip('.')}; use a checkpoint of a supported family.") from None


def weight_files(ckpt: str) -> dict[str, list[str]]:
    """{file path: [tensor names]} from the shard index, or every *.safetensors in the folder."""
    from safetensors import safe_open

    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(os.path.join(ckpt, fname), []).append(tensor)
        for path in files:
            if not os.path.isfile(path):
                raise ModelLoadError(f"shard {path} listed in {index} is missing; download the checkpoint again.")
        return files
    paths = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    if not paths:
        raise ModelLoadError(f"{ckpt} has no *.safetensors weights; convert the checkpoint to safetensors.")
    files = {}
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                files[path] = list(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise _corrupt(path, e) from None
    return files


def _corrupt(path: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"{path} is truncated or corrupt ({e}); delete it and download the checkpoint again.")


def check_local_weights(name_or_path: str) -> None:
    """For a local checkpoint folder, raise the ModelLoadError load_model would (no *.safetensors, a
    missing shard, a truncated or corrupt file) without reading a tensor: train.py asks before it
    writes its run folder. A preset or hub id is checked when it is downloaded."""
    path = os.path.expanduser(str(name_or_path))
    if name_or_path != "tiny" and os.path.isdir(path):
        check_file_sizes(weight_files(path))


def read_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor, memory-mapped, through a safe_open that is closed right after (see module doc)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        return t
    except Exception as e:
        raise _corrupt(path, e) from None


def check_file_sizes(files):
    """safe_open maps lazily; a file shorter than its header promises is caught here, before loading."""
    import struct

    for path in files:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, ValueError("file shorter than the 8-byte header length"))
            n = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError) as e:
                raise _corrupt(path, e) from None
        size = os.path.getsize(path)
        if size < 8 + n + end:
            raise _corrupt(path, ValueError(f"{size} bytes on disk, header describes {8 + n + end}"))


@contextlib.contextmanager
def no_random_init():
    """Skip nn.Linear / nn.Embedding random init while building on the meta device: the checkpoint
    overwrites every parameter, and running init on meta tensors imports torch's Python meta
    kernels (~5 s on a 2-core CPU)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def read_weights(
    ckpt: str, cfg: ModelConfig, expected: dict[str, tuple[int, ...]], rows: dict[str, tuple[int, int]] | None = None
):
    """Yield (our name, tensor) for each checkpoint tensor in `expected` ({our name: whole shape}),
    in file order: the one streaming reader of load_weights and distributed.load_sharded.

    Each tensor comes memory-mapped through its own short-lived safe_open (see the module doc), so
    callers copy what they keep. `rows` ({our name: (start, stop)}) reads only those rows of a
    tensor (safe_open's get_slice: the rest is never read). Checked here, once: file sizes, every
    tensor's whole shape against `expected`, then, after the last tensor, that none is unexpected
    or missing. A multimodal checkpoint's text-tower prefix goes to cfg.source_prefix; a stored tied
    head is skipped (it equals embed_tokens).
    """
    rows = rows or {}
    files = weight_files(ckpt)
    check_file_sizes(files)
    unexpected, seen = [], set()
    for path, names in files.items():
        for hf in names:
            ours = our_name(hf)
            if ours is None:
                continue
            if ours.startswith("model.") and hf != ours:  # a multimodal checkpoint's text tower
                cfg.source_prefix = hf[: len(hf) - len(ours) + len("model.")]
            if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some checkpoints store the tied head anyway; it equals embed_tokens
            if ours not in expected:
                unexpected.append(hf)
                continue
            yield ours, _read_checked(path, hf, tuple(expected[ours]), rows.get(ours))
            seen.add(ours)
    if unexpected:
        raise ModelLoadError(
            f"{ckpt} has tensors this {cfg.family} model does not use: {_few(unexpected)}; "
            "the checkpoint does not match its config.json."
        )
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ModelLoadError(f"{ckpt} is missing tensors {_few(missing)}; download the checkpoint again.")


def _read_checked(path: str, name: str, want: tuple[int, ...], rows: tuple[int, int] | None) -> torch.Tensor:
    """Tensor `name` of `path` (rows [start, stop) of it when `rows`), its whole shape checked first."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            part = f.get_slice(name)
            shape = tuple(part.get_shape())
            t = None if shape != want else f.get_tensor(name) if rows is None else part[rows[0] : rows[1]]
    except Exception as e:
        raise _corrupt(path, e) from None
    if t is None:
        raise ModelLoadError(
            f"tensor {name} in {os.path.basename(path)} has shape {shape} but config.json "
            f"implies {want}; the weights do not belong to this config.json."
        )
    return t


def place_tensor(model: nn.Module, ours: str, t: torch.Tensor, dtype, device, nf4: dict | None = None) -> None:
    """Put checkpoint tensor `t` (our name) into the meta-built `model`, as `dtype` on `device`.

    With `nf4` (NF4Linear.from_weight's keyword arguments) a block linear's weight becomes an
    NF4Linear right away; a bias read before its weight waits in the linear, one read after goes
    into the NF4Linear. A LoRA wrapper (distributed.load_sharded applies LoRA before loading)
    holds the checkpoint's linear as `.base`. Other tensors are copied out of the file mapping: a
    model backed by the file would crash (SIGBUS) if that file were later rewritten in place.
    """
    from minilora.quant.linear import NF4Linear

    mod_name, _, pname = ours.rpartition(".")
    owner = model.get_submodule(mod_name)
    mod = owner.base if isinstance(getattr(owner, "base", None), nn.Module) else owner
    quantized = nf4 is not None and is_block_linear(ours)
    t = t.to(device=device, dtype=dtype, copy=not quantized)
    if quantized:
        bias = None if mod.bias is None or mod.bias.is_meta else mod.bias  # bias sorts before weight
        q = NF4Linear.from_weight(t, bias, compute_dtype=dtype, **nf4)
        if mod is owner:
            set_module(model, mod_name, q)
        else:
            owner.base = q
    elif isinstance(mod, NF4Linear):  # a bias read after its weight
        mod.bias = t  # NF4Linear keeps its (frozen) bias as a buffer
    else:
        mod._parameters[pname] = nn.Parameter(t, requires_grad=mod._parameters[pname].requires_grad)


def load_weights(ckpt: str, cfg: ModelConfig, quantize, dtype, device, blocksize, double_quant) -> Transformer:
    """Stream the checkpoint in `ckpt` into a Transformer built on the meta device."""
    with torch.device("meta"), no_random_init():
        model = Transformer(cfg)
    model.tie_weights()
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied head is listed once, as embed
    nf4 = dict(blocksize=blocksize, double_quant=double_quant) if quantize == "nf4" else None
    for ours, t in read_weights(ckpt, cfg, expected):
        place_tensor(model, ours, t, dtype, device, nf4)
        del t  # the bf16 copy of a quantized weight dies here, before the next read
    model.tie_weights()
    model.inv_freq_global = model.inv_freq_global.to(device)
    model.inv_freq_local = model.inv_freq_local.to(device)
    return model.eval()


def _few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def load_tokenizer(path: str):
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def tiny_config(tokenizer=None) -> ModelConfig:
    """The `tiny` preset, its vocabulary size and special ids taken from `tokenizer` when one is given."""
    cfg = ModelConfig.from_name("tiny")
    if tokenizer is not None:
        cfg.vocab_size = tokenizer.vocab_size
        cfg.bos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.pad_id
        cfg.eos_token_ids = tuple(tokenizer.eos_ids)
    return cfg


def tiny_tokenizer():
    """The bundled tokenizer the `tiny` demo model uses (None when examples/ is not there)."""
    return load_tokenizer(_EXAMPLES_TOKENIZER) if os.path.isdir(_EXAMPLES_TOKENIZER) else None


def build_tiny(tokenizer=None, seed: int = 0, dtype=torch.float32, device="cpu") -> Transformer:
    """The `tiny` preset with seeded random weights (normal(0, 0.02) linears, normal(0, 0.5) embeddings, norms at
    their identity init), independent of and not disturbing the global RNG. Vocabulary size and
    special ids come from `tokenizer` when one is given."""
    cfg = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(cfg)
        for name, p in model.named_parameters():
            if name == "model.embed_tokens.weight":
                # The output head is tied to the embeddings and stays frozen under LoRA. With
                # std 0.02 its logits span only about +-1.3 (|h| = sqrt(D) after the final norm),
                # so no adapter could push the loss below ~5.7 nats; std 0.5 gives it room.
                nn.init.normal_(p, std=0.5)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    return model.to(device=device, dtype=dtype).eval()


def load_model(
    name_or_path: str,
    quantize: str | None = "nf4",
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    blocksize: int = 64,
    double_quant: bool = True,
):
    """(model, tokenizer) for a preset, an 'org/name' Hugging Face repo id or a local folder.

    quantize="nf4" stores every block linear as NF4 (QLoRA base); None keeps `dtype`. The
    tokenizer is None when the checkpoint has no tokenizer.json. Raises ModelLoadError (a
    ValueError) with one sentence saying what to do for every problem a user can cause.
    """
    if quantize not in ("nf4", None):
        raise ModelLoadError(f"quantize={quantize!r} is not supported; use 'nf4' or None.")
    dtype, device = _checked(dtype, device)
    if name_or_path == "tiny":
        tok = tiny_tokenizer()
        model = build_tiny(tok, dtype=dtype, device=device)
        if quantize == "nf4":
            quantize_linears(model, blocksize, double_quant, compute_dtype=dtype)
        return model, tok
    ckpt = resolve_checkpoint(name_or_path)
    cfg = read_config(ckpt, preset_name(name_or_path, ckpt))
    model = load_weights(ckpt, cfg, quantize, dtype, device, blocksize, double_quant)
    return model, load_tokenizer(ckpt)


def _checked(dtype, device) -> tuple[torch.dtype, torch.device]:
    """load_model's dtype (a floating torch.dtype, or its name: "bfloat16") and device (a torch.device or
    its name, one this torch can use), or a ModelLoadError in one sentence."""
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ModelLoadError(
            f"dtype={dtype!r} is not a weight dtype; pass torch.bfloat16, torch.float16 or torch.float32."
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device={device!r} is not a device; pass 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device={str(device)!r} needs a CUDA GPU, which this torch cannot see; pass device='cpu'."
        )
    return dtype, device


def preset_name(name_or_path: str, ckpt: str) -> str:
    """The name a checkpoint's ModelConfig carries: the preset's, else its folder's."""
    return name_or_path if name_or_path in PRESETS else os.path.basename(os.path.normpath(ckpt))


def load_config(name_or_path: str):
    """(ModelConfig, tokenizer) without weights: for a preset or hub id only its JSON and tokenizer
    files are fetched; the `tiny` demo model's preset with its bundled tokenizer."""
    if name_or_path == "tiny":
        tok = tiny_tokenizer()
        return tiny_config(tok), tok
    ckpt = resolve_checkpoint(name_or_path, allow_patterns=["*.json", "tokenizer*", "*.jinja"])
    return read_config(ckpt, preset_name(name_or_path, ckpt)), load_tokenizer(ckpt)


def plan_config(name_or_path: str):
    """(ModelConfig, tokenizer or None) for train.py --plan, which reads config.json and the data and
    downloads nothing else. A preset: its config.json and tokenizer from the local Hugging Face cache
    when it holds them (as a run would read them), else its table's copy of config.json (config.py)
    and no tokenizer. A hub repo: its config.json alone (its tokenizer if cached beside it). A local
    folder or `tiny`: as load_config reads them."""
    if name_or_path == "tiny" or os.path.isdir(os.path.expanduser(str(name_or_path))):
        return load_config(name_or_path)
    if name_or_path in PRESETS:
        repo = PRESETS[name_or_path]["hf_repo"]
        config, tokenizer = cached_folder(repo, "config.json"), cached_folder(repo, "tokenizer.json")
        model_cfg = ModelConfig.from_name(name_or_path) if config is None else read_config(config, name_or_path)
        return model_cfg, None if tokenizer is None else load_tokenizer(tokenizer)
    ckpt = resolve_checkpoint(name_or_path, allow_patterns=["config.json"])
    return read_config(ckpt, preset_name(name_or_path, ckpt)), load_tokenizer(ckpt)


def source_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor], ckpt: str) -> tuple[dict, dict]:
    """(tensors, config.json) of a checkpoint in the source's own architecture, for a merged export
    of a multimodal source: our text tensors renamed to its layout (checkpoint_name) plus every
    tensor we do not load (vision tower, projector) copied unchanged, and its config.json."""
    out = {checkpoint_name(k, cfg.source_prefix): v for k, v in tensors.items()}
    for path, names in weight_files(ckpt).items():
        for hf in names:
            if our_name(hf) is None and not hf.endswith("rotary_emb.inv_freq"):
                out[hf] = read_tensor(path, hf).clone()
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    return out, config
