"""Evaluation: perplexity, exact and structured match by greedy generation (evaluate.py), and the
report and its gates (report.py). eval.py at the top of the repository is the command."""
