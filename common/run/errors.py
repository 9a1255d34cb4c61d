"""The one exception type for problems a user can fix."""


class FedshopError(Exception):
    """Bad input or configuration; the message says what is wrong and where (file, field, row, value)."""
