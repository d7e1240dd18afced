"""Exception hierarchy. Only ``cli.py`` turns these into exit codes."""


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
