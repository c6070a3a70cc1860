"""DVG-Diffusion's 3-D U-Net: shapes, time conditioning, depth kept at full size, the paper networks' sizes and
the authors' state-dict key names (built on the meta device, so no memory or time), the depth position encodings,
and that a tiny network trains. All on the CPU in seconds."""
import json
import math

import pytest

torch = pytest.importorskip("torch")

from SVDRRLogic.models.unet3d import PAPER_CONFIGS, RelativePositionBias, RotaryEmbedding, Unet3D  # noqa: E402

TINY = {"dim": 8, "dim_mults": (1, 2), "channels": 8, "out_dim": 8, "attn_heads": 2, "attn_dim_head": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    return Unet3D(**TINY)


def test_forward_shape_and_finite():
    x = torch.randn(2, 8, 8, 8, 8)
    with torch.no_grad():
        y = tiny()(x, torch.tensor([0, 99]))
    assert y.shape == (2, 8, 8, 8, 8)
    assert torch.isfinite(y).all()


def test_other_depths_and_out_dim():
    """Depth is free (it is only attended over) and out_dim may differ from channels, as in the 24 -> 8 denoiser."""
    torch.manual_seed(0)
    net = Unet3D(**{**TINY, "channels": 24, "out_dim": 8})
    with torch.no_grad():
        y = net(torch.randn(1, 24, 5, 8, 4), torch.tensor([3.5]))
    assert y.shape == (1, 8, 5, 8, 4)


def test_bad_shapes_are_refused():
    net = tiny()
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 8, 8, 7, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="time"):
        net(torch.randn(2, 8, 8, 8, 8), torch.tensor([0]))


def test_output_depends_on_time():
    net, x = tiny(), torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        a, b = net(x, torch.tensor([0])), net(x, torch.tensor([50]))
        c = net(x, torch.tensor([50.0]))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(b, c)  # integer and float steps are the same step


def test_depth_is_never_downsampled():
    net, depth, shapes = tiny(), 8, []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
             for m in net.modules() if m is not net]
    with torch.no_grad():
        net(torch.randn(1, 8, depth, 8, 8), torch.tensor([7]))
    for hook in hooks:
        hook.remove()
    volumes = [s for s in shapes if len(s) == 5]
    assert volumes and all(s[2] == depth for s in volumes)
    assert min(s[3] for s in volumes) == 4 and min(s[4] for s in volumes) == 4  # H, W were halved once


@pytest.mark.parametrize("name, expected, tolerance", [("g_z", 35.7e6, 0.2e6), ("denoiser", 134.5e6, 0.5e6)])
def test_paper_parameter_counts(name, expected, tolerance):
    with torch.device("meta"):
        net = Unet3D(**PAPER_CONFIGS[name])
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - expected) <= tolerance, count
    assert len(net.state_dict()) == 300  # the authors' key count for dim_mults (1, 2, 4, 8)


#: Keys and shapes of the authors' denoiser (``Unet3D(dim=128, dim_mults=[1,2,4,8], channels=24, out_dim=8)`` in
#: ``ddpm/new_unet3d.py``): Residual.fn -> PreNorm.{fn, norm} -> EinopsToAndFrom.fn -> Attention.
AUTHORS_DENOISER_KEYS = {
    "time_rel_pos_bias.relative_attention_bias.weight": (32, 8),
    "init_conv.weight": (128, 24, 1, 3, 3),
    "init_temporal_attn.fn.norm.gamma": (1, 128, 1, 1, 1),
    "init_temporal_attn.fn.fn.fn.to_qkv.weight": (768, 128),
    "init_temporal_attn.fn.fn.fn.to_out.weight": (128, 256),
    "init_temporal_attn.fn.fn.fn.rotary_emb.freqs": (16,),
    "time_mlp.1.weight": (512, 128),
    "time_mlp.3.bias": (512,),
    "downs.0.0.mlp.1.weight": (256, 512),
    "downs.0.0.block1.proj.weight": (128, 128, 1, 3, 3),
    "downs.0.0.block1.norm.weight": (128,),
    "downs.0.1.block2.proj.bias": (128,),
    "downs.1.0.res_conv.weight": (256, 128, 1, 1, 1),
    "downs.0.2.fn.norm.gamma": (1, 128, 1, 1, 1),
    "downs.0.2.fn.fn.to_qkv.weight": (768, 128, 1, 1),
    "downs.0.2.fn.fn.to_out.bias": (128,),
    "downs.2.3.fn.fn.fn.to_qkv.weight": (768, 512),
    "downs.3.3.fn.fn.fn.rotary_emb.freqs": (16,),
    "downs.0.4.weight": (128, 128, 1, 4, 4),
    "downs.2.4.bias": (512,),
    "mid_block1.mlp.1.weight": (2048, 512),
    "mid_spatial_attn.fn.norm.gamma": (1, 1024, 1, 1, 1),
    "mid_spatial_attn.fn.fn.fn.to_qkv.weight": (768, 1024),
    "mid_spatial_attn.fn.fn.fn.to_out.weight": (1024, 256),
    "mid_temporal_attn.fn.fn.fn.rotary_emb.freqs": (16,),
    "mid_block2.block2.norm.bias": (1024,),
    "ups.0.0.block1.proj.weight": (512, 2048, 1, 3, 3),
    "ups.0.0.res_conv.weight": (512, 2048, 1, 1, 1),
    "ups.0.4.weight": (512, 512, 1, 4, 4),
    "ups.3.3.fn.fn.fn.to_out.weight": (128, 256),
    "final_conv.0.block1.proj.weight": (128, 256, 1, 3, 3),
    "final_conv.0.res_conv.weight": (128, 256, 1, 1, 1),
    "final_conv.1.weight": (8, 128, 1, 1, 1),
    "final_conv.1.bias": (8,),
}


def test_authors_key_names_and_shapes():
    with torch.device("meta"):
        state = Unet3D(**PAPER_CONFIGS["denoiser"]).state_dict()
    for key, shape in AUTHORS_DENOISER_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # Without conditioning the original registers no null embedding, no down-sampler after the last level, no
    # up-sampler after the last one and no mlp in the final (time-free) ResnetBlock.
    for absent in ("null_cond_emb", "downs.3.4.weight", "ups.3.4.weight", "final_conv.0.mlp.1.weight"):
        assert absent not in state


def test_config_round_trip():
    net = tiny()
    rebuilt = Unet3D(**json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x, t = torch.randn(1, 8, 4, 8, 8), torch.tensor([3])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), net(x, t))


def test_t5_buckets():
    """Offsets are query - key: exact buckets below 8, log-spaced up to 15, keys after the query in 16..31."""
    bias = RelativePositionBias(heads=2)
    offsets = torch.tensor([0, 1, 7, 8, 16, 31, 100, -1, -8, -100])
    assert bias.bucket(offsets).tolist() == [0, 1, 7, 8, 12, 15, 15, 17, 24, 31]
    assert bias(5, torch.device("cpu")).shape == (2, 5, 5)


def test_rotary_scores_depend_on_relative_position_only():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 8).expand(6, 8), torch.randn(1, 8).expand(6, 8)
    scores = rotary.rotate(q) @ rotary.rotate(k).T
    torch.testing.assert_close(torch.diagonal(scores, 1), torch.full((5,), scores[0, 1].item()))
    torch.testing.assert_close(rotary.rotate(q).norm(dim=-1), q.norm(dim=-1))
    assert math.isclose(scores[2, 2].item(), (q[0] @ k[0]).item(), rel_tol=1e-5)


def test_tiny_network_overfits():
    net = tiny()
    x = torch.randn(1, 8, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    z = torch.linspace(-1, 1, 8)
    target = (torch.sin(3 * z)[:, None, None] * torch.cos(2 * z)[None, :, None] * z).expand(1, 8, 8, 8, 8)
    time = torch.tensor([5])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(net(x, time), target).item()
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(net(x, time), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(net(x, time), target).item()
    assert after < 0.5 * before, (before, after)
