"""Writing a Hugging Face checkpoint folder: what transformers' save_pretrained writes.

  config.json             transformers-4.x dialect plus layer_types (see models.hf_config.to_hf_config)
  model.safetensors       transformers' tensor names; a tied lm_head is not stored; sharded with an
                          index past `max_shard_bytes`
  generation_config.json  the base's, else bos/eos/pad from the tokenizer
  tokenizer files         copied from the base (tokenizer.json, tokenizer_config.json with the chat
                          template, chat_template.jinja, special_tokens_map.json, ...)
  .minilora-export.json   written last: the files above, marking the folder as an export's
                          (minilora.export.target.MARKER; --overwrite replaces nothing else)

The folder is written into a temporary folder beside `out` and renamed into place at the end
(minilora.export.target.staged): an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from minilora.export.target import check_export_folder, staged, write_marker
from minilora.fileio import write_json

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
    """Write a Hugging Face checkpoint folder whole or not at all (temp folder + rename); returns `out`.
    overwrite replaces only an earlier export (minilora.export.target.check_export_folder)."""
    out = os.path.abspath(out)
    check_export_folder(out, overwrite)
    with staged(out, folder=True, overwrite=overwrite) as tmp:
        write_checkpoint_files(tmp, tensors, config, tokenizer_dir, generation_config, max_shard_bytes)
    return out


def write_checkpoint_files(
    folder: str,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tokenizer_dir: str | None = None,
    generation_config: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write the checkpoint's files (module docstring) into the new, empty `folder`, the marker last."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(
            os.path.join(folder, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    write_json(os.path.join(folder, "config.json"), config)
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, fname)):
                shutil.copyfile(os.path.join(tokenizer_dir, fname), os.path.join(folder, fname))
    if generation_config is not None:
        write_json(os.path.join(folder, "generation_config.json"), generation_config)
    write_marker(folder)


def generation_config(base_dir: str | None, hf_config: dict) -> dict:
    """The base checkpoint's generation_config.json, else one built from config.json's token ids."""
    path = os.path.join(base_dir, "generation_config.json") if base_dir else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
