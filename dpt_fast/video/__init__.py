"""Video depth: reading and writing frame sequences, temporal alignment of single-frame models,
a temporal-consistency metric on synthetic camera moves, and streaming inference.

Submodules: `io` (PyAV decode/encode, frame folders), `align` (TemporalAligner), `consistency`
(temporal_consistency), `synthetic` (moving-camera sequences with exact depth), `stream` (DepthStream).
"""
from .io import (DepthVideoWriter, Frame, FrameFolder, VideoFile, VideoReadError, VideoWriter, dequantize_depth,
                 is_video_name, natural_key, open_sequence, quantize_depth, read_depth16_video)

__all__ = ["DepthVideoWriter", "Frame", "FrameFolder", "VideoFile", "VideoReadError", "VideoWriter",
           "dequantize_depth", "is_video_name", "natural_key", "open_sequence", "quantize_depth",
           "read_depth16_video"]
