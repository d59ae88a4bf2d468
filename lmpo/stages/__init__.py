"""The stages around RL: SFT, reward-model training, evaluation."""
