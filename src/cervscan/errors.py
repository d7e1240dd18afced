"""Exception hierarchy and exit codes. Only the command line (:mod:`cervscan.cli`) turns these into exit codes."""


class CervscanError(Exception):
    """Base class for every error cervscan raises on purpose."""


class ModelNotFoundError(CervscanError):
    pass


class ChecksumError(CervscanError):
    pass


class CheckpointError(CervscanError):
    pass


class ImageError(CervscanError):
    """An input image cannot be used; the message names the file and reason."""


class DataError(CervscanError):
    pass


class DeviceError(CervscanError):
    pass


#: Exit codes of a run that finished: all decided; some image or patient failed; some patient inadequate.
EXIT_OK, EXIT_FAILED, EXIT_INADEQUATE = 0, 3, 5
#: Exit code of a command stopped by a CervscanError (no model, unwritable output, bad config, a model that
#: fails ``models verify``, ...); a usage error (a malformed option) exits with 2, the command-line parser's code.
EXIT_ERROR, EXIT_USAGE = 1, 2
#: Exit code of a classifier training (train-cls, either recipe) whose classifier failed its validation (no
#: better than chance on held-out patients, see :mod:`cervscan.training.validation`): no installable model was written.
EXIT_NOT_VALIDATED = 6
#: Exit code of a ``batch`` run refused because another run holds OUT's lock (:class:`BatchLockedError`).
EXIT_LOCKED = 4


class BatchLockedError(CervscanError):
    """Another ``batch`` run holds OUT's lock (exit code :data:`EXIT_LOCKED`)."""

    exit_code = EXIT_LOCKED


def exit_code_of(n_failed: int, n_inadequate: int) -> int:
    """3 when anything failed (it wins), else 5 when a patient is ``inadequate`` (retake), else 0."""
    return EXIT_FAILED if n_failed else (EXIT_INADEQUATE if n_inadequate else EXIT_OK)
