"""The project's error types, in one place. Each message names its culprit (a config key, a dataset
row, a reward function, a file); the CLI prints it and exits 2 for the bad-input ones. The modules
that raise them re-export them, so ``from lmpo.config import ConfigError`` and the like keep working."""


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


class ModelError(ValueError):
    """A model or tokenizer directory that cannot be used; the message names it."""


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and, where it applies, the row."""


class RewardError(ValueError):
    """A reward function or reward source is misconfigured or broke its contract.

    Raised for unknown reward specs, reward functions that return the wrong shape, remote
    endpoints that keep failing, and (with ``on_error="raise"``) the first per-sample failure.
    The message always names the function, URL or spec involved.
    """


class SandboxUnavailable(RuntimeError):
    """The sandbox's guarantees cannot be given on this machine (the message says which)."""


class OutputError(ConfigError):
    """The output directory cannot take this run: not a directory, not writable, full, locked."""


class DivergedError(ConfigError):
    """Training diverged: non-finite losses, gradients or weights (almost always a setting: the
    learning rate, the gradient clipping, the rewards). Exit status 2 from the CLI."""


class MonitorAlarm(RuntimeError):
    """A monitor alarm with ``monitor.action: stop``; the CLI prints it and exits 2."""


class VLLMServerError(ConfigError):
    """The vLLM server at ``rollout.vllm_url`` cannot be reached or answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status        # the HTTP status when the server answered, else None


class WorkerError(RuntimeError):
    """A Ray worker died past its restarts, or did not answer in time."""
