"""The RL loop: setup into one `Run` record, then steps of typed records (records.py):
sampling.py (1–2) → passes.py (3) → advantages in `advantage.core` (4) → update.py (5) →
step.py (6); trainer.py runs the steps, evaluation, checkpoints (checkpointing.py, resuming.py) and the report.

Imports `advantage.core`, `advantage.engine` and `advantage.tasks`.
"""
