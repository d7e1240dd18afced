"""cervscan: colposcopy screening decision support.

Segments each colposcopy image (U-Net++), classifies the original and the
segmented image (RepVGG or another timm model), combines six image variants by
weighted voting and aggregates the image scores per patient.

The result supports, and does not replace, a clinician's judgement.
"""

__version__ = "0.1.0"
