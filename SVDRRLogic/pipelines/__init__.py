"""Inference pipelines (diffusers ``DiffusionPipeline`` subclasses) that take and return images in our C-arm
convention; importing this needs torch, diffusers and transformers."""
from .svdrr import (PA_VIEW, SVDRROutput, SVDRRPipeline, clip_input, denoise, encode_condition, normalize_source,
                    svdrr_relative_pose, view_seed, view_tokens)

__all__ = ["PA_VIEW", "SVDRROutput", "SVDRRPipeline", "clip_input", "denoise", "encode_condition",
           "normalize_source", "svdrr_relative_pose", "view_seed", "view_tokens"]
