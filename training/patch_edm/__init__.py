"""Training of the 3D patch EDM X-ray-to-CT model (Yoon et al.; ``../shared/reference/dvg-and-patch-diffusion.md``
section E), on the cases of :mod:`training.recon.preprocess`:

- :mod:`.data` -- per case the spread back-projections of its frontal and lateral DRRs (computed once, kept in
  RAM), random slabs along k with their global coordinates;
- :mod:`.train` -- the accelerate loop: EDM loss, Adam, EMA with a half-life, checkpoints and resume, export of the
  EMA weights to a model folder.

Evaluation goes through the shared harness, ``python -m training.recon.evaluate --method patch-edm``.
"""
