"""The error every export module raises for a request that cannot be done (one sentence naming
the input and what to do). Its own module, so the format writers need not import merge.py,
which imports them all."""


class ExportError(ValueError):
    """An export the user asked for cannot be done; the message says what to do."""
