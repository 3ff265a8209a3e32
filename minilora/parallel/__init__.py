"""Several processes: DDP and FSDP2 over the NF4 base (distributed.py), the embedding, head and loss
split by vocabulary rows (vocab_parallel.py), and checkpoints written shard by shard
(sharded_checkpoint.py). errors.py holds the one error they raise."""
