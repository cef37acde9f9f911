"""Beyond captions: `<loc>` boxes and `<seg>` masks in answers, the VQ-VAE mask decoder, and drawing the results."""

from .drawing import draw_objects
from .locations import DetectedObject, box_iou, encode_objects, parse_locations
from .segmentation import MaskDecoder, decode_objects, load_mask_decoder

__all__ = ["DetectedObject", "MaskDecoder", "box_iou", "decode_objects", "draw_objects", "encode_objects",
           "load_mask_decoder", "parse_locations"]
