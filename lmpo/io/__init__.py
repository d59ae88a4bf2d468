"""What a run writes and reads back: its output directory, checkpoints, metrics and logs, signals."""
