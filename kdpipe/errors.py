"""Errors a user can fix by changing the config or the command line."""


class ConfigError(ValueError):
    """A config value that makes no sense; the message says what is wrong and how to fix it."""
