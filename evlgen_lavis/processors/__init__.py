"""Processors LAVIS lacks: image processors that take any PIL image (and, for video, decord readers)."""
from evlgen_lavis.processors.image import EVLGenImageEvalProcessor, EVLGenImageTrainProcessor  # noqa: F401
from evlgen_lavis.processors.video import EVLGenVideoEvalProcessor, EVLGenVideoTrainProcessor, UnreadableVideoError  # noqa: F401,E501
