"""The error every layer raises for a bad config value."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (e.g. ``config.batch_size``)."""


def check(condition: bool, field: str, message: str) -> None:
    """Raises ConfigError("config.<field>: <message>") unless ``condition``."""
    if not condition:
        raise ConfigError(f"config.{field}: {message}")
