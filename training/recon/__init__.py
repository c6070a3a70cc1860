"""Training data and evaluation shared by SVDRR's two X-ray-to-CT reconstruction methods (DVG-Diffusion and the 3D
patch EDM): the X2CT-GAN preprocessing of CTs into unit volumes (:mod:`.preprocess`) and a method-independent
evaluation harness with the published metric conventions (:mod:`.evaluate`)."""
