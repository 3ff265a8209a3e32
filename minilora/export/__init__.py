"""Export: merge an adapter into its base (merge.py) and write what others load: a Hugging Face
checkpoint (hf_checkpoint.py), bitsandbytes' NF4 layout (bnb.py), GGUF for llama.cpp and Ollama
(gguf.py, gguf_vocab.py); then read it back through an independent reader (readback.py). target.py
says where an export may be written and puts it there only after the read-back passed; errors.py
holds the one error they all raise."""
