"""The error every layer raises for bad input: one line naming the flag, file or field and the fix; exit code 2."""


class UsageError(Exception):
    """A problem with the command line or its files; reported in one line, exit code 2, nothing written."""
