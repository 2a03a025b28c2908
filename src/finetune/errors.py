"""The one exception type a user is meant to read.

Anything raised as `FinetuneError` is printed by `train.py` as a single paragraph, without a
traceback, and the run exits non-zero. Its message must say what is wrong, where the code looked,
and how to fix it.
"""

import difflib


class FinetuneError(RuntimeError):
    """A problem with the user's input or environment, explained in the message."""


class DataUnavailableError(FinetuneError):
    """A dataset is absent and could not be downloaded or generated."""


class WeightsUnavailableError(FinetuneError):
    """Pretrained weights could not be had; we never fall back to random weights silently."""


class UnknownNameError(FinetuneError):
    """A model, weights, strategy or dataset name that does not exist."""


# Up to this many valid names are listed in full; a longer list shows only the closest ones,
# which are what a typo needs (torchvision has 80 models, timm over a thousand).
LISTED_IN_FULL = 12


def unknown_name(
    kind: str, name: str, valid: list[str] | tuple[str, ...], listing: str = ""
) -> UnknownNameError:
    """The error for `name`, not among `valid`: the closest match first ("did you mean"), then
    every valid name, or for a long list only the closest few and `listing` (how to see all:
    `timm.list_models()`)."""
    closest = closest_names(name, [str(v) for v in valid])
    guess = f" Did you mean '{closest[0]}'?" if closest else ""
    if len(valid) <= LISTED_IN_FULL:
        choices = ", ".join(sorted(valid))
        return UnknownNameError(f"Unknown {kind} '{name}'.{guess} Valid choices: {choices}.")
    everything = f"{len(valid)} names in all" + (f": {listing}" if listing else "")
    nearest = f"Closest: {', '.join(closest)} ({everything})" if closest else everything
    return UnknownNameError(f"Unknown {kind} '{name}'.{guess} {nearest}.")


def closest_names(name: str, valid: list[str], most: int = 5) -> list[str]:
    """Up to `most` of `valid` like `name` (difflib's ratio of at least 0.6), the most alike
    first; equally alike ones in the order of `valid` (efficientnet_lite0 before _lite2)."""
    ratio = {v: difflib.SequenceMatcher(None, name, v).ratio() for v in valid}
    alike = sorted((v for v in valid if ratio[v] >= 0.6), key=lambda v: -ratio[v])
    return alike[:most]
