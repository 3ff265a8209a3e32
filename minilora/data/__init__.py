"""Data: JSONL records in every supported format (records.py), exact and near-duplicate removal
(dedup.py), the held-out split and its contamination check (holdout.py), rendering and loss masks
(encode.py), preference pairs for DPO and ORPO (pairs.py), the pipeline from files to encoded
examples (prepare.py), batches, padded or packed (packing.py), and token counts estimated without a
tokenizer (token_estimate.py, for train.py --plan)."""
