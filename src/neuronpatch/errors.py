"""Errors raised by neuronpatch.

One base class, :class:`NeuronpatchError`, and narrow subclasses that also
inherit the builtin they resemble, so ``except ValueError`` keeps working for
callers who do not know this library. Every message is one line that names the
file, the key, the value and what is allowed: the CLI and the pytest plugin
print it as it is, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class NeuronpatchError(Exception):
    """Base class of every error neuronpatch raises on purpose."""


class HeadConfigError(NeuronpatchError, ValueError):
    """A head directory's config.json or weights are missing, malformed or inconsistent."""


class UnfrozenHeadError(HeadConfigError):
    """A head from a pipeline run that fine-tuned the base model: on the original model it means nothing."""


class UnsafeArtifactError(NeuronpatchError, ValueError):
    """A weights file would need to execute code (an arbitrary pickle) to load."""


class ModelLoadError(NeuronpatchError, OSError):
    """A model could not be found locally or could not be booted."""


class InputError(NeuronpatchError, ValueError):
    """The texts to run are empty, too long for the model, or unreadable."""


class ControlsError(InputError):
    """A ``controls`` value is malformed, or asks for controls the head's unit cannot have."""


class InterventionError(NeuronpatchError, ValueError):
    """An intervention is unknown or has an invalid value."""


class ProbeSpecError(NeuronpatchError, ValueError):
    """A probe file does not follow the probe schema."""


class BaselineError(NeuronpatchError, ValueError):
    """A baseline file is missing, unreadable or from an incompatible format."""



class LimitError(NeuronpatchError, ValueError):
    """A file is over a documented limit, is not a regular file, or holds bytes it must not."""


class PatchError(NeuronpatchError, RuntimeError):
    """A patch did not take effect: its hook never ran, or the unit holds another value after it."""


class OutputPathError(NeuronpatchError, OSError):
    """An output path cannot be written: a file stands where a directory belongs, or the reverse."""


def config_error(path: Path | str, key: str, value: object, allowed: str) -> HeadConfigError:
    """Build the one-line error for a bad config value.

    Example:
        >>> str(config_error("h/config.json", "target_layer", 9, "an int in [0, 3]"))
        "h/config.json: key 'target_layer' = 9 is invalid; expected an int in [0, 3]"
    """
    return HeadConfigError(f"{path}: key {key!r} = {value!r} is invalid; expected {allowed}")
