"""Training stages: the RL loop (rl.py) and its construction (setup.py), torchrun and Ray, SFT,
reward-model training, evaluation, checkpoints and metric logging."""
