"""Training, the pieces train.py's loop calls: its flags (config.py), the memory and FLOP plan
(memory_plan.py) and the settings chosen from it (planner.py), what the process holds
(process_memory.py), the chunked loss through the frozen head (loss.py), the objectives the loop asks for
each micro-batch's loss (objectives.py: SFT; dpo.py, orpo.py on preference pairs through
pair_objective.py, with the frozen base as DPO's reference, reference.py), what setup, loop and
finish share (run.py), the learning-rate schedule and batch stream (schedule.py), checkpoints
(checkpoint.py) and the run folder (rundir.py)."""
