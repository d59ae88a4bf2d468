"""The RL loop: collect, prepare, update, loss; building a run; the training forward."""
