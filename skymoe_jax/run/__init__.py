"""A training run: the loop (loop.py) and the periodic work it calls each step (actions.py)."""
