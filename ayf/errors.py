"""User-facing errors: the CLI prints these as one line, without a traceback."""


class AyfError(Exception):
    """Base class of errors caused by the user's input or configuration."""


class ConfigError(AyfError, ValueError):
    """A configuration value or combination that cannot work."""


class CheckpointError(AyfError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


class NonFiniteLossError(AyfError):
    """Training produced a NaN or infinite loss."""
