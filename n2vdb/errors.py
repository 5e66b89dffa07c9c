"""Every error a user can cause is an N2vdbError: the CLI prints its message on one line."""


class N2vdbError(Exception):
    """A user-facing error. The message says what went wrong and what to do."""

    exit_code = 1


class UsageError(N2vdbError):
    """Bad arguments: unknown names, wrong parameter types."""

    exit_code = 2


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
