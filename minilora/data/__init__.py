"""Data: JSONL records in every supported format (records.py), exact and near-duplicate removal
(dedup.py), the held-out split and its contamination check (holdout.py), rendering and loss masks
(encode.py), and batches, padded or packed (packing.py)."""
