"""The engine layer: everything the loop drives that is not the loop itself.

Rollout backends (`rollout/`), model loading and log-probs (`models`), prompt data (`data`),
reward functions and their combination (`rewards`, `reward_helpers`), the reward model
(`reward_model`), tools for multi-turn episodes and the sandboxed `python` tool (`tools`,
`sandbox`), supervised training (`supervised`), optimizers (`optim`), process groups
(`parallel`), mixed precision (`precision`), atomic checkpoints (`checkpoint`), metrics out
(`logger`, `report`), held-out evaluation (`evaluation`), typed config loading (`configlib`).

Imports `advantage.core` and itself only; never the loop, the stages or the built-in tasks.
"""
