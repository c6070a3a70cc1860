"""DVG-Diffusion training (``../shared/reference/dvg-and-patch-diffusion.md`` section C), one module per step:

- :mod:`.config` -- defaults (the authors' values), YAML configs, ``--set`` overrides, one-line validation;
- :mod:`.data` -- the preprocessed unit CTs and, per case, the pipeline's back-projections and frozen-network
  latents, cached in RAM;
- :mod:`.stages` -- the five stages (CT VQ-GAN, input VPGE, G_z, new-view VPGE, denoiser) and their losses;
- :mod:`.train` -- the accelerate loop (multi-GPU / multi-node), checkpoints, resume, EMA, metrics;
- :mod:`.export` -- a finished run -> a model folder for ``DVGReconstructionPipeline.from_folder``.

Evaluation goes through the shared harness, ``python -m training.recon.evaluate --method dvg``.
"""
