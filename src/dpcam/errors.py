"""The one exception users see: a single line saying what is wrong, where, and how to fix it."""


class UserError(Exception):
    """Bad input a user can fix. The CLI prints ``error: <message>`` and exits with code 2."""

    exit_code = 2
