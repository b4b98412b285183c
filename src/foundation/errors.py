"""Errors a user can cause. `training.main` prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad flag, bad path, bad data: the message says what to do."""


class DataError(UserError):
    """The training data cannot be read as asked (wrong columns, no shards, too many bad samples)."""


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; raised before anything is written, so no checkpoint is poisoned."""
