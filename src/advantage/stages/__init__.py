"""The stages around RL: supervised fine-tuning (`sft`), reward-model training (`rm`), the
SFT → RM → PPO chain (`chain`), evaluating any model on any dataset (`evaluate`), and comparing
configurations over seeds: many ordinary runs (`sweep`) and one page about them (`compare`).

Imports `advantage.core`, `advantage.engine`, `advantage.tasks` and `advantage.rl`.
"""
