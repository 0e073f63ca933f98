"""The stages around RL: supervised fine-tuning (`sft`), reward-model training (`rm`), the
SFT → RM → PPO chain (`chain`), and evaluating any model on any dataset (`evaluate`).

Imports `advantage.core`, `advantage.engine`, `advantage.tasks` and `advantage.rl`.
"""
