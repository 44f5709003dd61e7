"""The DfpError tree: every failure a user can fix is one of these, with a one-line message.

The CLI turns a DfpError into `error: <message>` and its `exit_code` (2 for bad input, 1 otherwise);
anything that is not a DfpError is a bug and keeps its traceback.
"""


class DfpError(Exception):
    """Base of all expected failures. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(DfpError):
    """Bad user input: recipe, paths, weights, data files. Exit code 2."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe key is unknown, of the wrong type or out of range. The message starts with the key path."""


class WeightsError(InputError):
    """A weights file is missing, truncated, or does not match the model."""


class DataError(InputError):
    """An evaluation or calibration data file is missing or has the wrong layout."""


class BackendUnavailable(DfpError):
    """The requested backend cannot run here (library or hardware missing); the message says why."""


class ParityError(DfpError):
    """The engine's outputs differ from the PyTorch model's by more than the tolerance."""


class ExportError(DfpError):
    """ONNX export or validation failed."""
