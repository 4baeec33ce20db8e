"""Exceptions that synjax raises for bad input.

Every message names the culprit (file, dataset, config key) and what was
expected, so that a user can fix the input without reading a traceback.
"""


class SynjaxError(Exception):
    """Base class of the errors synjax raises on purpose."""


class DataError(SynjaxError, ValueError):
    """A volume, dataset or annotation is missing or not what was expected."""


class ConfigError(SynjaxError, ValueError):
    """A config field has a value synjax cannot use."""
