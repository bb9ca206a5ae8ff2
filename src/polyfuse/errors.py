"""User-facing errors.

A `UserError` is a mistake the user can fix (bad config key, malformed row, missing file). The CLI
prints its message without a traceback and exits with code 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input: config, data file, model path or CLI flag."""


class ConfigError(UserError):
    """A config key is missing, unknown or of the wrong type."""


class DataError(UserError):
    """A data file has a malformed row; the message names the file and line."""


@contextmanager
def named_data_errors(path: object, *also: object) -> Iterator[None]:
    """A `DataError` raised inside names `path`, the file the rows came from, first: once, so an error that
    already starts with it (or with one of the files `also` names) is left as it is. `path` None: nothing to add."""
    try:
        yield
    except DataError as err:
        named = tuple(str(p) for p in (path, *also) if p is not None)
        if path is None or str(err).startswith(named):
            raise
        raise DataError(f"{path}: {err}") from None


class StorageError(UserError):
    """The disk refused a write: read-only file system, no space, file too large, no permission, or an
    output path of the wrong kind (a file where a folder must go)."""


_STORAGE_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the process's file-size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of this path is a file, expected a folder",
    errno.EEXIST: "exists and is not a folder",
    errno.EISDIR: "is a folder, expected a file",
}


def storage_error(err: BaseException, where: object = None) -> StorageError | None:
    """The user-facing form of an error that the user's disk or paths caused, else None (a bug). `where`
    names the output when the error does not (a failed write has no file name).

    Libraries written in Rust (safetensors, tokenizers) raise their own exception types for I/O failures,
    with Rust's "(os error N)" in the text."""
    if isinstance(err, StorageError):
        return err
    code, where = getattr(err, "errno", None), getattr(err, "filename", None) or where
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code not in _STORAGE_ERRNOS:
        return None
    return StorageError(f"cannot write {where or 'the output'}: {_STORAGE_ERRNOS[code]} ({os.strerror(code)})")
