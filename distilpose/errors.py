"""One small hierarchy of domain errors.

Every message is one line naming the file or field and what was expected; the CLI prints it as
`error: <message>` and exits with code 1, so users never see a traceback for bad input.
"""


class DistilPoseError(Exception):
    """Base class: an error caused by the user's input, files or settings, not by a bug."""


class BadAnnotationError(DistilPoseError):
    """An annotation or detections file that is unreadable or lacks an expected field."""


class BadImageError(DistilPoseError):
    """An image that is missing or cannot be decoded."""


class StoreMismatchError(DistilPoseError):
    """A store made with another teacher, seed, dataset or sizes than the ones asked for."""


class StoreFormatError(DistilPoseError):
    """A store that is unreadable, incomplete or of a newer schema than this code."""


class BadCheckpointError(DistilPoseError):
    """A checkpoint that is not loadable, unsafe, or made for another model."""


class BadConfigError(DistilPoseError):
    """An option or configuration value outside what is accepted."""


class BadInputError(DistilPoseError):
    """An input file over a limit (size, nesting, number length) or otherwise unreadable."""


class RankError(DistilPoseError):
    """Another process of a multi-process run (torchrun) failed or did not arrive in time."""


class StoreCorruptError(StoreFormatError):
    """Stored bytes that fail their checksum, or data of a complete unit that is missing."""


class StoreConnectionError(StoreFormatError):
    """A remote store that cannot be reached or does not answer in time."""
