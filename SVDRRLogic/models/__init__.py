"""Network definitions (diffusers/transformers modules), importable without Slicer; importing this needs torch,
diffusers and transformers.

SV-DRR: :func:`build_svdrr` (random, or empty on the meta device), :func:`create_random` (a folder in the
authors' layout), :func:`load_svdrr` (their released folders or ours, never executing code from them).
"""
from .svdrr import (CONFIGS, POSE_DIM, CCProjection, ModelLoadError, SVDRRComponents, build_svdrr,
                    component_configs, dpm_solver_from_config, vae_scale_factor)
from .svdrr_folder import AUTHORS_MODEL_INDEX, check_compatible, create_random, load_svdrr, save_svdrr

__all__ = ["AUTHORS_MODEL_INDEX", "CONFIGS", "POSE_DIM", "CCProjection", "ModelLoadError", "SVDRRComponents",
           "build_svdrr", "check_compatible", "component_configs", "create_random", "dpm_solver_from_config",
           "load_svdrr", "save_svdrr", "vae_scale_factor"]
