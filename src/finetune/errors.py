"""The one exception type a user is meant to read.

Anything raised as `FinetuneError` is printed by `train.py` as a single paragraph, without a
traceback, and the run exits non-zero. Its message must say what is wrong, where the code looked,
and how to fix it.
"""


class FinetuneError(RuntimeError):
    """A problem with the user's input or environment, explained in the message."""


class DataUnavailableError(FinetuneError):
    """A dataset is absent and could not be downloaded or generated."""


class WeightsUnavailableError(FinetuneError):
    """Pretrained weights could not be had; we never fall back to random weights silently."""


class UnknownNameError(FinetuneError):
    """A model, weights, strategy or dataset name that does not exist."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UnknownNameError:
    choices = ", ".join(sorted(valid))
    return UnknownNameError(f"Unknown {kind} '{name}'. Valid choices: {choices}.")
