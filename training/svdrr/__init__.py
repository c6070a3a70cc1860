"""SV-DRR training (``../shared/reference/svdrr-method.md`` sections 2-5), one module per step:

- :mod:`.render_dataset` -- DRR datasets in the LIDC-IDRI-DRR style from CTs or phantoms (``views.json`` per
  patient, ``manifest.json`` with the train/test split); sources in :mod:`.ct_sources`, split in :mod:`.manifest`;
- :mod:`.data` -- (PA source, random hemisphere target) pairs, as the authors' ``LidcidriHardFBData``;
- :mod:`.diffusion` -- the IDDPM objective: epsilon MSE + the learned-range variance VLB term;
- :mod:`.objective` -- the trainable module (transformer + cc_projection) and the conditioning dropout;
- :mod:`.model_setup` -- from scratch, from PixArt-Sigma, from a lower-resolution stage; export to a model folder;
- :mod:`.train` -- the accelerate loop (multi-GPU / multi-node), checkpoints, resume, validation images, export;
- :mod:`.evaluate` / :mod:`.metrics` -- PSNR, SSIM (and LPIPS when installed) on the "simple" arc and the
  hemisphere, with the copy-the-source baseline.
"""
