"""The data package's error type, in a module of its own so that every data module can raise it
without importing the config module (which itself checks files through indexed.py and index_check.py)."""


class DataConfigError(ValueError):
    """A data setting is wrong; the message names the field (data.xxx) to change."""
