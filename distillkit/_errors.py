"""The exception bad arguments raise.

``InputError`` is both a ValueError and a TypeError: a wrong dtype (integer logits, float labels) is
caught by ``except ValueError`` like every other bad argument, and by ``except TypeError`` as Python
code usually expects. Its message always names the argument.
"""


class InputError(ValueError, TypeError):
    """A bad argument: wrong type, dtype, shape, range, or values (NaN)."""
