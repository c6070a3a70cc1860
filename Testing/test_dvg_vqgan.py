"""DVG-Diffusion's 3-D VQ-GAN: the authors' state-dict names and the paper configuration's size, shapes, the
codebook's quantisation and training rules, the latent scaling and a short overfit. Tiny networks on the CPU, a few
seconds in all. (Converting the authors' checkpoints: Testing/test_dvg_convert.py.)"""
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors", reason="safetensors is not installed")

from SVDRRLogic.models.vqgan3d import VQGAN3D  # noqa: E402

TINY = dict(n_hiddens=8, downsample=(4, 4, 4), embedding_dim=4, n_codes=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    return VQGAN3D(**TINY)


def blob(size=16, seed=0):
    """A smooth random volume in [0, 1]: a few Gaussian blobs, like a tiny CT."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    volume = torch.zeros(size, size, size)
    for _ in range(3):
        centre = torch.rand(3, 1, 1, 1, generator=gen) * 1.2 - 0.6
        volume += torch.exp(-((grid - centre) ** 2).sum(0) / 0.1)
    return (volume / volume.max())[None, None]


def distance_to_nearest(rows, candidates):
    """Exact Euclidean distance from each row to its closest candidate (``cdist`` rounds at 1e-4 here)."""
    return ((rows[:, None, :] - candidates[None]) ** 2).sum(-1).min(1).values.sqrt()


def trained_codebook(model):
    """Initialise the codebook from one batch (as the first training step does), then switch to eval."""
    model.train()
    with torch.no_grad():
        model(blob())
    return model.eval()


# -- the authors' names and the paper configuration -----------------------------------------------------------

# Literal names from xiexing0916/DVG-Diffusion vq_gan_3d/model/vqgan.py and codebook.py (commit 46d32ee): convs
# are wrapped by SamePadConv3d (.conv) / SamePadConvTranspose3d (.convt), GroupNorm is final_block[0].
AUTHORS_KEYS = {
    "encoder.conv_first.conv.weight": (16, 1, 3, 3, 3),
    "encoder.conv_blocks.0.down.conv.weight": (32, 16, 4, 4, 4),
    "encoder.conv_blocks.1.res.norm1.weight": (64,),
    "encoder.conv_blocks.1.res.conv2.conv.bias": (64,),
    "encoder.final_block.0.weight": (64,),
    "pre_vq_conv.conv.weight": (8, 64, 1, 1, 1),
    "post_vq_conv.conv.weight": (64, 8, 1, 1, 1),
    "decoder.final_block.0.bias": (64,),
    "decoder.conv_blocks.0.up.convt.weight": (64, 64, 4, 4, 4),
    "decoder.conv_blocks.1.up.convt.weight": (64, 32, 4, 4, 4),
    "decoder.conv_blocks.1.res2.norm2.weight": (32,),
    "decoder.conv_last.conv.weight": (1, 32, 3, 3, 3),
    "codebook.embeddings": (16384, 8),
    "codebook.N": (16384,),
    "codebook.z_avg": (16384, 8),
}


def test_paper_configuration_has_the_authors_names_shapes_and_size():
    model = VQGAN3D()
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    for name, shape in AUTHORS_KEYS.items():
        assert shapes[name] == shape, name
    assert len(shapes) == 71   # the authors' autoencoder + codebook, without discriminators and LPIPS
    # The authors' thop comment says 441.056 K / 947.521 K: those counts leave out the GroupNorm affine
    # parameters (512 in the encoder, 896 in the decoder).
    count = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("encoder", "decoder")}
    assert count == {"encoder": 441_056 + 512, "decoder": 947_521 + 896}
    assert [m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)] == [32] * 14
    assert model.config["downsample"] == [4, 4, 4] and model.config["n_codes"] == 16384
    assert VQGAN3D(**json.loads(json.dumps(model.config))).config == model.config   # saved as JSON, rebuilt


def test_group_count_adapts_to_small_widths():
    groups = {m.num_channels: m.num_groups for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {16: 16, 32: 32}   # gcd(32, channels)


def test_rejects_bad_downsampling_and_sizes():
    with pytest.raises(ValueError, match="powers of two"):
        VQGAN3D(downsample=(3, 4, 4))
    with pytest.raises(ValueError, match="multiple"):
        tiny().encode(torch.zeros(1, 1, 18, 16, 16))


# -- shapes and quantisation -------------------------------------------------------------------------------------


def test_forward_and_latent_shapes():
    model = tiny()
    x = blob()
    recon, vq = model(x)
    assert recon.shape == x.shape
    assert vq.embeddings.shape == (1, 4, 4, 4, 4) and vq.encodings.shape == (1, 4, 4, 4)
    assert vq.encodings.dtype == torch.int64 and vq.commitment_loss.ndim == 0
    assert 1.0 <= float(vq.perplexity) <= 32.0
    assert model.encode(x).shape == (1, 4, 4, 4, 4)
    anisotropic = VQGAN3D(**{**TINY, "downsample": (4, 2, 1)})
    assert anisotropic.encode(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 4, 2, 4, 8)
    assert anisotropic.decode(torch.zeros(1, 4, 2, 4, 8)).shape == (1, 1, 8, 8, 8)


def test_decode_with_quantize_uses_the_nearest_codes():
    model = trained_codebook(tiny())
    with torch.no_grad():
        z = model.encode(blob(seed=1))
        codes = model.encode(blob(seed=1), quantize=True)
        rows = codes.movedim(1, -1).reshape(-1, 4)
        book = model.codebook.embeddings
        # every quantised vector is exactly a codebook row, and the closest one
        assert ((rows[:, None, :] == book[None]).all(-1)).any(-1).all()
        nearest = ((z.movedim(1, -1).reshape(-1, 1, 4) - book) ** 2).sum(-1).argmin(1)
        assert torch.equal(rows, book[nearest])
        vq = model.quantize(z)
        assert torch.allclose(vq.embeddings, codes) and torch.equal(vq.encodings.flatten(), nearest)
        snapped = book[nearest].T.reshape(1, 4, 4, 4, 4)
        assert torch.allclose(model.decode(z), model.decoder(model.post_vq_conv(snapped)))
        assert not torch.equal(model.decode(z), model.decode(z, quantize=False))


def test_straight_through_gradient_reaches_the_encoder():
    model = trained_codebook(tiny())
    model.train()
    recon, vq = model(blob())
    (recon.abs().mean() + vq.commitment_loss).backward()
    assert model.encoder.conv_first.conv.weight.grad.abs().sum() > 0


# -- codebook training rules -------------------------------------------------------------------------------------


def snapshot(model):
    return {k: v.clone() for k, v in model.codebook.state_dict().items()}


def test_first_batch_initialises_and_the_state_is_saved():
    model = tiny()
    assert not model.codebook.initialized
    z = torch.randn(1, 4, 4, 4, 4)
    model.eval()
    model.quantize(z)
    assert not model.codebook.initialized          # eval never initialises
    model.train()
    vq = model.quantize(z)
    assert model.codebook.initialized
    # Initial codes are batch vectors (64 vectors >= 32 codes: no tiling noise). A code chosen by no other vector
    # than its own source is unchanged by the EMA step that follows.
    alone = torch.bincount(vq.encodings.flatten(), minlength=32) == 1
    assert alone.sum() > 8
    assert distance_to_nearest(model.codebook.embeddings[alone], z.movedim(1, -1).reshape(-1, 4)).max() < 1e-6

    fresh = tiny(seed=1)
    fresh.load_state_dict(model.state_dict())
    assert fresh.codebook.initialized
    before = snapshot(fresh)
    fresh.train()
    z2 = torch.randn(1, 4, 4, 4, 4)
    torch.manual_seed(3)
    fresh.quantize(z2)
    torch.manual_seed(3)
    model.quantize(z2)                             # the same step on the original: no re-initialisation
    assert torch.equal(fresh.codebook.embeddings, model.codebook.embeddings)
    assert not torch.equal(fresh.codebook.embeddings, before["embeddings"])


def test_ema_update_and_dead_code_restart_in_training_only():
    model = tiny()
    z = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        model.codebook.embeddings.copy_(torch.randn(32, 4))
        model.codebook.z_avg.copy_(model.codebook.embeddings * 10.0)
        model.codebook.N.fill_(10.0)
        model.codebook.N[:4] = 0.0                 # four dead codes
    before = snapshot(model)

    model.eval()
    model.quantize(z)
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name

    model.train()
    vq = model.quantize(z)
    counts = torch.bincount(vq.encodings.flatten(), minlength=32).float()
    expected_n = 0.99 * before["N"] + 0.01 * counts
    assert torch.allclose(model.codebook.N, expected_n)
    sums = torch.zeros(32, 4).index_add_(0, vq.encodings.flatten(), z.movedim(1, -1).reshape(-1, 4))
    assert torch.allclose(model.codebook.z_avg, 0.99 * before["z_avg"] + 0.01 * sums)
    alive = expected_n >= 1.0
    total = expected_n.sum()
    smoothed = (expected_n + 1e-7) / (total + 32 * 1e-7) * total
    assert torch.allclose(model.codebook.embeddings[alive], (model.codebook.z_avg / smoothed[:, None])[alive])
    dead = ~alive
    assert dead[:4].all()
    # restarted codes are vectors of this batch
    restarted = model.codebook.embeddings[dead]
    assert distance_to_nearest(restarted, z.movedim(1, -1).reshape(-1, 4)).max() < 1e-6
    assert not torch.equal(restarted, before["embeddings"][dead])


def test_perplexity_counts_the_codes_in_use():
    model = tiny().eval()
    with torch.no_grad():
        model.codebook.embeddings.copy_(torch.eye(4).repeat(8, 1) * torch.arange(1, 33)[:, None])
    z = model.codebook.embeddings[[0, 1, 2, 3]].T.reshape(1, 4, 1, 2, 2).repeat(1, 1, 2, 1, 1)
    assert math.isclose(float(model.quantize(z).perplexity), 4.0, rel_tol=1e-5)


# -- latent scaling ----------------------------------------------------------------------------------------------


def test_normalisation_maps_the_codebook_range_to_unit_interval():
    model = trained_codebook(tiny())
    low, high = model.latent_bounds()
    book = model.codebook.embeddings
    assert (low, high) == (float(book.min()), float(book.max()))
    ends = torch.tensor([low, high])
    assert torch.allclose(model.normalize_latent(ends), torch.tensor([-1.0, 1.0]))
    z = torch.randn(2, 4, 4, 4, 4)
    assert torch.allclose(model.denormalize_latent(model.normalize_latent(z)), z, atol=1e-5)
    assert model.normalize_latent(book).abs().max() <= 1.0 + 1e-6


# -- training --------------------------------------------------------------------------------------------------


def test_short_overfit_halves_the_reconstruction_error():
    """One resolution level on 8^3 keeps the 30 steps near a second; the codebook trains along (EMA)."""
    torch.manual_seed(0)
    model = VQGAN3D(**{**TINY, "downsample": (2, 2, 2)})
    model.train()
    x = blob(size=8, seed=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, vq = model(x)
        loss = (recon - x).abs().mean()
        losses.append(loss.item())
        optimiser.zero_grad()
        (loss + vq.commitment_loss).backward()
        optimiser.step()
    with torch.no_grad():
        final = (model(x)[0] - x).abs().mean().item()
    assert final < 0.5 * losses[0], losses
