"""The one error type of the cache contract."""


class CacheError(Exception):
    """A cache is missing, incomplete, corrupt, or does not match what the caller expects."""
