"""cervscan: colposcopy screening decision support.

Segments each colposcopy image (U-Net++), classifies the original and the
segmented image (RepVGG or another timm model), combines six image variants by
weighted voting and aggregates the image scores per patient.

The result supports, and does not replace, a clinician's judgement.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one version, the package's (pyproject.toml), equal to the CHANGELOG's latest release
    __version__ = version("cervscan")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
