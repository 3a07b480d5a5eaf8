"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class LeukofedError(Exception):
    """An error the user can fix; the message names the file or parameter and the fix."""


class ConfigError(LeukofedError):
    """A parameter in params.yaml is missing, unknown, of the wrong type or out of range."""


class DataError(LeukofedError):
    """The dataset (folder, archive, download or an image in it) cannot be used as given."""
