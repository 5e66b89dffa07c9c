"""Every error a user can cause is an N2vdbError: the CLI prints its message on one line."""

import errno


class N2vdbError(Exception):
    """A user-facing error. The message says what went wrong and what to do."""

    exit_code = 1


class UsageError(N2vdbError):
    """Bad arguments: unknown names, wrong parameter types.

    An error about one setting says so with param=, the setting's Python name (`epochs`, as n2vdb.api
    and TrainSettings call it), and its message begins with that name. The library never names a
    command-line flag; the CLI says `--epochs` instead (in_words), from its own option declarations.
    """

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None):
        if param is not None and not message.startswith(param):
            raise ValueError(f"an error about {param!r} begins with its name: {message!r}")
        super().__init__(message)
        self.param = param

    def in_words(self, name: str) -> str:
        """The message with its setting called NAME (the CLI's `--epochs`) instead of its Python name."""
        message = str(self)
        return name + message[len(self.param) :] if self.param is not None else message


class DatabaseBusy(N2vdbError):
    """Another process holds the database file's write lock."""


class DatasetError(N2vdbError):
    """A dataset directory is missing, malformed or inconsistent."""


class ModelError(UsageError):
    """Unknown model or layer, or weights that cannot be loaded."""


class WeightsUnavailable(N2vdbError):
    """Pretrained weights are not cached and cannot be downloaded."""


class QueryError(N2vdbError):
    """A named query or ad-hoc SQL failed."""


class NotFound(UsageError):
    """An unknown concept, probe or dataset name."""


_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "free some space and run the command again",
    errno.EDQUOT: "free some space and run the command again",
    errno.ENAMETOOLONG: "a file name is too long for the file system",
    errno.ENOTDIR: "a file stands where a directory is needed",
    errno.EEXIST: "a file of that name is in the way",
    errno.EISDIR: "that is a directory; give a file name",
    errno.EPIPE: "the reader of the output closed it early",
    errno.EBADF: "redirect it to a file or /dev/null",
}


def describe_os_error(exc: OSError) -> str:
    """An operating-system error on one line: what failed, on which path, and what to do."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    if isinstance(exc.filename, str) and len(exc.filename) > 120:
        where = f" ({exc.filename[:60]}...{exc.filename[-40:]})"
    hint = _OS_HINTS.get(exc.errno)
    return f"{reason}{where}" + (f": {hint}" if hint else "")
