"""User-facing errors: the CLI prints these as one line, without a traceback."""


class AyfError(Exception):
    """Base class of errors caused by the user's input or configuration. ``missing``: the path of a
    file or folder that is not there, when that is the error (the CLI then names the config key
    that holds it)."""

    def __init__(self, *args, missing=None):
        super().__init__(*args)
        self.missing = missing


class ConfigError(AyfError, ValueError):
    """A configuration value or combination that cannot work."""


class CheckpointError(AyfError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


class NonFiniteLossError(AyfError):
    """Training produced a NaN or infinite loss."""


def user_error(err: BaseException):
    """The first :class:`AyfError` in an exception's cause and context chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, AyfError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
