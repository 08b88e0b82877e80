"""The errors a user can cause: seqcls.train prints their one-line message and exits with code 2.

Kept free of heavy imports so that the entry point can name them before torch loads.
"""


class ConfigError(ValueError):
    """A mistake in the user's config; the message names the field and the fix."""


class DataError(ValueError):
    """Bad or missing data; the message names the file or row and the fix."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step."""
