"""Errors that end a run with one clear line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (dataset, config, path); the message says what and where."""


class DatasetError(UserError):
    """A dataset root that does not satisfy the on-disk contract."""


class ConfigError(UserError):
    """A configuration value that cannot work (empty split, impossible pair recipe, ...)."""
