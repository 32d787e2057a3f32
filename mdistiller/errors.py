"""Errors shared by every layer of the package (a leaf module: it imports nothing of mdistiller)."""


class ConfigError(ValueError):
    """A config file, override or registry name that cannot be used; the message names the key, the value and what
    was expected, and the command-line tools print it as one line (exit status 2)."""
