"""Training, the pieces train.py's loop calls: its flags (config.py), the memory and FLOP plan
(planner.py), the chunked loss through the frozen head (loss.py), the learning-rate schedule and
batch stream (schedule.py), checkpoints (checkpoint.py) and the run folder (rundir.py)."""
