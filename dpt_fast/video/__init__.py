"""Video depth: reading and writing frame sequences, temporal alignment of single-frame models,
a temporal-consistency metric on synthetic camera moves, and streaming inference.

Submodules: `io` (PyAV decode/encode, frame folders), `align` (TemporalAligner), `consistency`
(temporal_consistency, evaluate_synthetic), `synthetic` (moving-camera sequences with exact depth),
`stream` (DepthStream), `windows` (Video Depth Anything's windowed inference over a window model),
`batch` (many videos: sharded by video, resumable per video), `predictors` (per frame or windowed).
"""
from .align import TemporalAligner, align_sequence, fit_scale_shift
from .batch import Source, VideoSummary, collect_sequences, predict_videos, shard
from .consistency import evaluate_synthetic, temporal_consistency
from .io import (DepthVideoWriter, Frame, FrameFolder, VideoFile, VideoReadError, VideoWriter, dequantize_depth,
                 is_video_name, natural_key, open_sequence, quantize_depth, read_depth16_video)
from .predictors import is_video_model, sequence_predictor
from .stream import DepthStream, StreamResult, measure_latency, model_predictor
from .synthetic import MOTIONS, camera_sequence
from .windows import merge_windows, window_plan, windowed_video_depth

__all__ = ["DepthVideoWriter", "Frame", "FrameFolder", "VideoFile", "VideoReadError", "VideoWriter",
           "dequantize_depth", "is_video_name", "natural_key", "open_sequence", "quantize_depth",
           "read_depth16_video", "TemporalAligner", "align_sequence", "fit_scale_shift", "evaluate_synthetic",
           "temporal_consistency", "MOTIONS", "camera_sequence", "DepthStream", "StreamResult", "measure_latency",
           "model_predictor", "merge_windows", "window_plan", "windowed_video_depth", "Source", "VideoSummary",
           "collect_sequences", "predict_videos", "shard", "is_video_model", "sequence_predictor"]
