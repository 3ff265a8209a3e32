"""Writing a Hugging Face checkpoint folder: what transformers' save_pretrained writes.

  config.json             transformers-4.x dialect plus layer_types (see models.hf_config.to_hf_config)
  model.safetensors       transformers' tensor names; a tied lm_head is not stored; sharded with an
                          index past `max_shard_bytes`
  generation_config.json  the base's, else bos/eos/pad from the tokenizer
  tokenizer files         copied from the base (tokenizer.json, tokenizer_config.json with the chat
                          template, chat_template.jinja, special_tokens_map.json, ...)

The folder is written into a temporary folder beside `out` and renamed into place at the end: an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from minilora.export.errors import ExportError
from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions, write_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
)  # a multimodal source's processor


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


def check_export_folder(out: str, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless overwrite (raised before any work is done)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file; pass a folder path for the checkpoint.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it.")


def write_checkpoint(
    out: str,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    tokenizer_dir: str | None = None,
    generation_config: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Write a Hugging Face checkpoint folder atomically (temp folder + rename); returns `out`."""
    from safetensors.torch import save_file

    out = os.path.abspath(out)
    check_export_folder(out, overwrite)
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
            write_json(
                os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
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
