"""The one error type of the reward layer."""


class RewardError(ValueError):
    """A reward function or reward source is misconfigured or broke its contract.

    Raised for unknown reward specs, reward functions that return the wrong shape, remote
    endpoints that keep failing, and (with ``on_error="raise"``) the first per-sample failure.
    The message always names the function, URL or spec involved.
    """
