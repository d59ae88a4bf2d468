"""Launchers that run the loop somewhere else: the Ray backend (learner, rollout and reward actors)."""
