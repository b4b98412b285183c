"""Errors a user can cause. `training.main` prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad flag, bad path, bad data: the message says what to do."""


class DataError(UserError):
    """The training data cannot be read as asked (wrong columns, no shards, too many bad samples)."""


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; raised before anything is written, so no checkpoint is poisoned."""


class CheckpointRefused(UserError, ValueError):
    """A checkpoint a loader will not use: not a regular file, not a zip of stored records as torch.save writes,
    a tensor whose storage cannot hold it, a field of the wrong type or shape for what it is used for, weights
    that do not fit the model its spec builds. Raised before torch or numpy uses the offending value; the
    message is one line naming the file and the key. (A ValueError too: a bad value inside a file.)"""
