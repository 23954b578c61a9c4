"""The one base class of every bad-input error, so entry points can print it as one line."""


class UserError(ValueError):
    """Input that cannot be used; the message names the problem and what to do."""
