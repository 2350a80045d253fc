"""Errors a user can fix by changing the config or the command line."""


class ConfigError(ValueError):
    """A config value that makes no sense; the message says what is wrong and how to fix it."""


def build(node, key: str, **kwargs):
    """`hydra.utils.instantiate(node, **kwargs)`, with a `ConfigError` raised by the class itself
    passed on as one line naming the config key (Hydra wraps it in a multi-line exception)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{key}: {cause}") from exc
        target = node.get("_target_") if hasattr(node, "get") else node
        raise ConfigError(f"{key} cannot be built from {target}: {' '.join(str(cause).split())}") from exc
