"""Tests of train.augment: SRC's defining properties, the baselines, spatial and intensity augmentation.

Small tensors (≤ 2×1×24³), CPU, fixed seeds: the whole file runs in a few seconds on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from SRCSMSegmenterLib.normalization import Normalization
from train import augment
from train.augment import gin as gin_mod
from train.augment import randconv as rc_mod
from train.augment import spatial as sp_mod
from train.augment import src as src_mod
from train.augment._common import bspline_matrix, gaussian_kernel_1d

B, L, N = 2, 4, 24


def _image(seed: int = 0, b: int = B, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, n, n, n, generator=g)


def _labels(seed: int = 1, b: int = B, n: int = N, num_classes: int = L) -> torch.Tensor:
    """Blocky label map: a few boxes of each class so masks have interiors and boundaries."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (b, 1, 3, 3, 3), generator=g).float()
    return F.interpolate(coarse, size=(n, n, n), mode="nearest")[:, 0].long()


# --------------------------------------------------------------------------------------------- SRC


def _reference_rcnet(x: torch.Tensor, bank: src_mod.RCNetBank, net: int) -> torch.Tensor:
    """One RCNet, written plainly (true kernel sizes, float64): lrelu(conv) ×4, mix, renormalise."""
    h = x.double()
    for layer in range(4):
        w = bank.kernel(net, layer).double()
        h = F.leaky_relu(F.conv3d(h, w, padding=w.shape[-1] // 2), 0.1)
    a = float(bank.alphas[net])
    y = a * h + (1 - a) * x.double()
    return y / y.norm() * x.double().norm()


def _reference_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full 5³ Gaussian (σ = 1) with zero padding, then renormalised — float64."""
    k1 = gaussian_kernel_1d(1.0, 2).double()
    k3 = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).double()
    m = F.conv3d(onehot, k3.expand(num_classes, 1, 5, 5, 5), padding=2, groups=num_classes)
    return m / m.sum(1, keepdim=True)


def test_src_matches_per_label_loop_reference():
    x, lab = _image(), _labels()
    out, bank = augment.semantic_random_convolution(x, lab, L, 123, return_bank=True)
    masks = _reference_masks(lab, L)
    ref = torch.zeros(B, 1, N, N, N, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            ref[b] += _reference_rcnet(x[b:b + 1], bank, b * L + l)[0] * masks[b, l]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_both_first_layer_layouts_agree(monkeypatch):
    """CPU reads one channels-last image copy per network; other devices one image per group."""
    x, lab = _image(), _labels()
    out_cpu = augment.semantic_random_convolution(x, lab, L, 17)
    gin_cpu = gin_mod.gin(x, 17)
    monkeypatch.setattr(augment._common, "expand_first_layer", lambda device: False)
    out_gpu_layout = augment.semantic_random_convolution(x, lab, L, 17)
    torch.testing.assert_close(out_gpu_layout, out_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gin_mod.gin(x, 17), gin_cpu, rtol=1e-5, atol=1e-5)


def test_separable_gaussian_matches_full_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 10, 11, 12, generator=g, dtype=torch.float64)
    for radius, padding in ((2, "zeros"), (4, "replicate")):
        k1 = gaussian_kernel_1d(1.0, radius).double()
        k3 = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :]).expand(3, 1, *(2 * radius + 1,) * 3)
        mode = "constant" if padding == "zeros" else "replicate"
        ref = F.conv3d(F.pad(x, (radius,) * 6, mode=mode), k3, groups=3)
        torch.testing.assert_close(src_mod.separable_gaussian_3d(x, 1.0, radius, padding), ref)


def test_src_draws_one_network_per_label_per_sample():
    stats = augment.RCNetStats()
    _, bank = augment.semantic_random_convolution(_image(), _labels(), L, 7, stats=stats, return_bank=True)
    assert bank.n == B * L
    assert stats.accepted == B * L
    assert stats.drawn == B * L + stats.rejected


def test_src_absent_labels_still_draw_their_network():
    x = _image()
    only_background = torch.zeros(B, N, N, N, dtype=torch.long)
    s1, s2 = augment.RCNetStats(), augment.RCNetStats()
    _, bank1 = augment.semantic_random_convolution(x, only_background, L, 5, stats=s1, return_bank=True)
    _, bank2 = augment.semantic_random_convolution(x, _labels(), L, 5, stats=s2, return_bank=True)
    assert s1.drawn == s2.drawn and s1.accepted == s2.accepted == B * L
    torch.testing.assert_close(bank1.alphas, bank2.alphas, rtol=0, atol=0)
    for w1, w2 in zip(bank1.weights, bank2.weights):
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)


def test_src_masks_sum_to_one_inside_the_volume():
    lab = _labels()
    for smoothing in (True, False):
        masks = src_mod.label_masks(lab, L, smoothing)
        assert masks.shape == (B, L, N, N, N)
        torch.testing.assert_close(masks.sum(1), torch.ones(B, N, N, N))
        assert masks.min() >= 0
    # the smoothing is the paper's zero-padded 5³ Gaussian (σ = 1), renormalised (our departure)
    torch.testing.assert_close(src_mod.label_masks(lab, L).double(), _reference_masks(lab, L), rtol=1e-5,
                               atol=1e-6)
    # …and without the renormalisation the outer 2 voxels would sum to less than one
    onehot = F.one_hot(lab, L).permute(0, 4, 1, 2, 3).float()
    raw = src_mod.separable_gaussian_3d(onehot, 1.0, 2).sum(1)
    assert raw[:, 0].max() < 0.99 and raw[:, 1].max() < 0.999
    torch.testing.assert_close(raw[:, 2:-2, 2:-2, 2:-2], torch.ones(B, N - 4, N - 4, N - 4))


def test_each_rcnet_output_has_the_norm_of_the_whole_image():
    x = _image() * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    r, _ = src_mod.sample_rcnet_outputs(x, L, 3)
    assert r.shape == (B, L, N, N, N)
    norms = r.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms, x.flatten(1).norm(dim=1)[:, None].expand(B, L), rtol=1e-5, atol=0)


def test_src_output_in_a_single_label_image_is_that_labels_rcnet():
    x = _image()
    lab = torch.full((B, N, N, N), 2, dtype=torch.long)
    out, bank = augment.semantic_random_convolution(x, lab, L, 11, return_bank=True)
    for b in range(B):
        ref = _reference_rcnet(x[b:b + 1], bank, b * L + 2)
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_src_hard_masks_pick_the_voxels_label_network():
    x, lab = _image(), _labels()
    out = augment.semantic_random_convolution(x, lab, L, 4, smoothing=False)
    r, _ = src_mod.sample_rcnet_outputs(x, L, 4)  # same seed ⇒ same networks
    picked = r.gather(1, lab.unsqueeze(1))
    torch.testing.assert_close(out, picked)


def test_rcnet_is_positively_homogeneous():
    x = _image(b=1)
    bank = src_mod.draw_rcnets(3, 0)
    y1, n1 = src_mod.apply_rcnets(x, bank, 3)
    y2, n2 = src_mod.apply_rcnets(2.5 * x, bank, 3)
    scale = float(y1.abs().max())  # fp32 sums of large random products: compare relative to the range
    torch.testing.assert_close(y2, 2.5 * y1, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(n2, 2.5 * n1, rtol=1e-5, atol=0)
    # after renormalisation the gain passes straight through: RCNet(a·x) = a·RCNet(x)
    r1, _ = src_mod.sample_rcnet_outputs(x, 3, 9, reject_above=None)
    r2, _ = src_mod.sample_rcnet_outputs(0.5 * x, 3, 9, reject_above=None)
    torch.testing.assert_close(r2, 0.5 * r1, rtol=1e-5, atol=1e-6)


def test_rcnet_draw_distribution():
    bank = src_mod.draw_rcnets(400, 0)
    assert set(bank.kernel_sizes.unique().tolist()) == {1, 3}
    assert 0.4 < (bank.kernel_sizes == 3).float().mean() < 0.6
    assert 0 <= float(bank.alphas.min()) and float(bank.alphas.max()) < 1
    taps = torch.cat([bank.kernel(n, 1).flatten() for n in range(bank.n)])
    assert abs(float(taps.std()) - 1.0) < 0.05 and abs(float(taps.mean())) < 0.05  # N(0, 1), no fan-in
    one = (bank.kernel_sizes[:, 2] == 1).nonzero()[0, 0]
    full = bank.weights[2].view(400, 2, 2, 3, 3, 3)[one]
    assert int((full != 0).sum()) == 4  # a 1³ layer: only the centre taps (2×2 channels) are non-zero


def _sabotaged_draws(monkeypatch):
    """First draw: net 0 explodes (‖y‖ > 65504), net 1 outputs zeros, net 2 gives NaN."""
    real = src_mod.draw_rcnets
    calls = []

    def fake(n, generator=None, device="cpu"):
        bank = real(n, generator, device)
        if not calls:
            bank.weights[0][0:2] *= 1e4
            bank.alphas[1] = 1.0
            bank.weights[3][1:2] = 0.0
            bank.weights[3][2:3] = float("inf")
        calls.append(n)
        return bank

    monkeypatch.setattr(src_mod, "draw_rcnets", fake)
    return calls


def test_src_rejects_and_redraws_only_the_bad_networks(monkeypatch):
    x, lab = _image(), _labels()
    _, clean = augment.semantic_random_convolution(x, lab, L, 21, return_bank=True)
    calls = _sabotaged_draws(monkeypatch)
    stats = augment.RCNetStats()
    out, bank = augment.semantic_random_convolution(x, lab, L, 21, stats=stats, return_bank=True)
    assert torch.isfinite(out).all()
    assert stats.rejected >= 3 and stats.drawn == B * L + stats.rejected and stats.rounds >= 1
    assert calls[0] == B * L and calls[1] == 3  # the redraw asks only for the three rejected networks
    # the untouched networks are kept as first drawn
    torch.testing.assert_close(bank.alphas[3:], clean.alphas[3:], rtol=0, atol=0)
    # and every accepted network is within the fp16 range
    _, norms = src_mod.apply_rcnets(x, bank, L)
    assert torch.isfinite(norms).all() and (norms > 0).all() and (norms <= src_mod.FP16_MAX).all()


def test_src_rejection_threshold_is_respected():
    x = _image()
    _, bank = src_mod.sample_rcnet_outputs(x, L, 8, reject_above=None)
    _, first = src_mod.apply_rcnets(x, bank, L)
    threshold = float(first.flatten().median())
    stats = augment.RCNetStats()
    _, bank = src_mod.sample_rcnet_outputs(x, L, 8, reject_above=threshold, stats=stats)
    _, norms = src_mod.apply_rcnets(x, bank, L)
    assert stats.rejected >= (first > threshold).sum()
    assert (norms <= threshold).all()


def test_src_gives_up_with_a_clear_message_when_nothing_passes():
    with pytest.raises(RuntimeError, match="normalised"):
        src_mod.sample_rcnet_outputs(_image(), L, 0, reject_above=1e-9, max_rounds=2)
    with pytest.raises(ValueError, match="labels must lie in"):
        augment.semantic_random_convolution(_image(), _labels(num_classes=L + 1), L, 0)
    with pytest.raises(ValueError, match="non-finite"):
        augment.semantic_random_convolution(_image() * float("inf"), _labels(), L, 0)


def test_src_leaves_an_all_zero_image_zero():
    x = torch.zeros(1, 1, 8, 8, 8)
    stats = augment.RCNetStats()
    out = augment.semantic_random_convolution(x, torch.zeros(1, 8, 8, 8, dtype=torch.long), 3, 0, stats=stats)
    assert (out == 0).all() and stats.rejected == 0


def test_src_needs_no_gradients_and_ignores_autocast():
    x = _image().requires_grad_(True)
    out = augment.semantic_random_convolution(x, _labels(), L, 1)
    assert not out.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = augment.semantic_random_convolution(x, _labels(), L, 1)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out)


def test_global_rcnet_keeps_the_norm_and_counts_one_draw_per_sample():
    x = _image()
    stats = augment.RCNetStats()
    out = augment.global_rcnet(x, 2, stats=stats)
    assert out.shape == x.shape and stats.accepted == B
    torch.testing.assert_close(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------- RandConv


def test_randconv_kernel_sizes_weights_and_mixing():
    x = _image(b=64, n=8)
    out, p = rc_mod.randconv(x, 0, return_params=True)
    assert set(p["kernel_size"].tolist()) == {1, 3, 5, 7}
    assert 0 <= float(p["alpha"].min()) and float(p["alpha"].max()) < 1
    for i in range(64):
        k = int(p["kernel_size"][i])
        w = p["weights"][i]
        assert w.shape == (1, 1, k, k, k)
        a = float(p["alpha"][i])
        ref = a * F.conv3d(x[i:i + 1], w, padding=k // 2) + (1 - a) * x[i:i + 1]
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    # Kaiming normal, gain 1: std = 1/sqrt(C_in·k³); pool the normalised taps of all draws
    z = torch.cat([w.flatten() * math.sqrt(w.numel()) for w in p["weights"]])
    assert abs(float(z.std()) - 1.0) < 0.1 and abs(float(z.mean())) < 0.1
    out_img, p_img = rc_mod.randconv(x, 0, mixing=False, return_params=True)
    assert (p_img["alpha"] == 1).all()


def test_randconv_consistency_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    assert float(rc_mod.consistency_loss([logits, logits, logits])) == pytest.approx(0.0, abs=1e-6)
    views = [logits, logits + torch.randn(logits.shape, generator=g), logits * 2]
    loss = rc_mod.consistency_loss(views, weight=1.0)
    probs = [F.softmax(v, 1) for v in views]
    log_mix = (sum(probs) / 3).clamp(1e-7, 1).log()
    ref = sum(F.kl_div(log_mix, p, reduction="none").sum(1).mean() for p in probs) / 3
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(rc_mod.consistency_loss(views), 10 * loss)


# ------------------------------------------------------------------------------------------ GIN-IPA


def test_gin_follows_the_paper():
    x = _image(b=3, n=12)
    out, p = gin_mod.gin(x, 0, return_params=True)
    assert out.shape == x.shape and out.dtype == torch.float32
    # Frobenius renormalisation to the input's norm
    torch.testing.assert_close(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-4, atol=0)
    assert set(p["kernel_sizes"].unique().tolist()) <= {1, 3} and p["kernel_sizes"].shape == (3, 4)
    assert 0 <= float(p["alpha"].min()) and float(p["alpha"].max()) < 1
    # reference: plain per-sample loop with the true kernel sizes, lrelu(0.01) except after the last layer
    for i in range(3):
        h = x[i:i + 1]
        for layer in range(4):
            k = int(p["kernel_sizes"][i, layer])
            w = p["weights"][layer][i]
            c = (w.shape[-1] - k) // 2
            w = w[..., c:c + k, c:c + k, c:c + k]
            h = F.conv3d(h, w, p["biases"][layer][i], padding=k // 2)
            if layer < 3:
                h = F.leaky_relu(h, 0.01)
        a = float(p["alpha"][i])
        mixed = a * h + (1 - a) * x[i:i + 1]
        ref = mixed * x[i].norm() / (mixed.norm() + 1e-5)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-4, atol=1e-5)
    taps = torch.cat([w.flatten()[w.flatten() != 0] for w in p["weights"]])
    assert abs(float(taps.std()) - 1.0) < 0.15  # N(0, 1) weights, no fan-in scaling


def test_ipa_field_is_in_unit_range_and_smooth():
    m = gin_mod.ipa_field(3, (32, 24, 32), 0)
    assert m.shape == (3, 1, 32, 24, 32)
    flat = m.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat.max(1).values, torch.ones(3), rtol=0, atol=1e-6)
    assert float(flat.std(1).min()) > 0.05  # not constant
    for dim in (2, 3, 4):  # 4 cells per axis: neighbouring voxels differ by a small fraction of the range
        assert float(m.diff(dim=dim).abs().max()) < 0.2
    second = m.diff(n=2, dim=2).abs().max()
    assert float(second) < 0.05  # a quadratic B-spline: small, piecewise-constant second differences


def test_gin_ipa_views_follow_the_recipe():
    x = _image(n=12)
    a, b, c, m = gin_mod.gin_ipa(x, 3, return_field=True)
    g = torch.Generator().manual_seed(3)
    g1, g2, g3 = gin_mod.gin(x, g), gin_mod.gin(x, g), gin_mod.gin(x, g)
    m_ref = gin_mod.ipa_field(B, (12, 12, 12), g)
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(a, g1 * m + g2 * (1 - m))
    torch.testing.assert_close(b, g1 * (1 - m) + g2 * m)
    torch.testing.assert_close(c, g3)
    assert len(gin_mod.gin_ipa(x, 3, plain_view=False)) == 2


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_gin_consistency_loss_matches_their_kldiv():
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 3, 4, 4, 4, generator=g) for _ in range(3)]
    loss = gin_mod.consistency_loss(views)
    probs = torch.cat([F.softmax(v, 1) for v in views])
    p_avg = (probs[:2] + probs[2:4] + probs[4:]) / 3
    ref = 10.0 * torch.nn.KLDivLoss()(F.log_softmax(torch.cat(views), 1), torch.cat([p_avg] * 3))
    torch.testing.assert_close(loss, ref)
    assert float(gin_mod.consistency_loss([views[0]] * 3)) == pytest.approx(0.0, abs=1e-7)


def test_gin_consistency_loss_has_finite_gradients_for_confident_networks():
    """A trained network's logits differ by > 100 between classes: softmax underflows to exactly 0.
    The consistency term must keep its value and give finite gradients there (a NaN gradient makes the
    trainer skip the step — it skipped 30–100 % of GIN-IPA steps before this was fixed)."""
    g = torch.Generator().manual_seed(1)
    views = [(torch.randn(2, 4, 5, 5, 5, generator=g) * 60).requires_grad_() for _ in range(3)]
    with torch.no_grad():
        assert (torch.stack([F.softmax(v, 1) for v in views]).sum(0) == 0).any()  # underflow happens
    loss = gin_mod.consistency_loss(views)
    loss.backward()
    assert torch.isfinite(loss)
    for v in views:
        assert torch.isfinite(v.grad).all()
    # same value and gradient as the textbook form where nothing underflows
    small = [(v.detach() / 60).requires_grad_() for v in views]
    ref_small = [v.detach().clone().requires_grad_() for v in small]
    gin_mod.consistency_loss(small).backward()
    p_avg = sum(F.softmax(v, 1) for v in ref_small) / 3
    ref = 10.0 * sum((p_avg * (p_avg.log() - F.log_softmax(v, 1))).mean() for v in ref_small) / 3
    ref.backward()
    for a, b in zip(small, ref_small):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------ spatial


def test_bspline_basis_is_a_partition_of_unity():
    for order, n_ctrl in ((3, 8), (2, 6)):
        w = bspline_matrix(37, n_ctrl, order)
        torch.testing.assert_close(w.sum(1), torch.ones(37))
        assert (w >= 0).all()


def test_identity_parameters_give_the_identity():
    x, lab = _image(), _labels()
    params = sp_mod.SpatialParams.identity(B)
    params.control_points = torch.zeros(B, 3, 8, 8, 8)
    out, out_lab = sp_mod.spatial_transform(x, lab, params, (N, N, N), (1.0, 1.5, 2.0), label_mode="nearest")
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert torch.equal(out_lab, lab)
    # a larger input crop: the output is its centre
    out, out_lab = sp_mod.spatial_transform(x, lab, params, (16, 20, 12), (1.0, 1.0, 1.0),
                                            label_mode="linear", num_classes=L)
    torch.testing.assert_close(out, x[:, :, 4:20, 2:22, 6:18], rtol=0, atol=1e-5)
    assert out_lab.shape == (B, 16, 20, 12)


def _blob(shape, centre_xyz_mm, spacing_xyz, sigma_mm=2.0):
    """Gaussian blob (1, 1, D, H, W); ``centre`` in mm relative to the volume centre, (x, y, z)."""
    d, h, w = shape
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s for n, s in zip((w, h, d), spacing_xyz)]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    cx, cy, cz = centre_xyz_mm
    r2 = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2
    return torch.exp(-r2 / (2 * sigma_mm ** 2)).float()[None, None]


def _centroid_mm(img, spacing_xyz):
    d, h, w = img.shape[2:]
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s for n, s in zip((w, h, d), spacing_xyz)]
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    v = img[0, 0].double()
    return torch.stack([(v * c).sum() / v.sum() for c in (xx, yy, zz)])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_known_rotation_moves_a_blob_where_expected(axis):
    spacing = (1.0, 1.5, 2.0)  # anisotropic: the rotation must be physical, not in voxel units
    shape = (24, 32, 40)  # D, H, W
    q0 = torch.tensor([6.0, -4.0, 5.0], dtype=torch.float64)  # blob position in the input, mm (x, y, z)
    x = _blob(shape, q0.tolist(), spacing)
    params = sp_mod.SpatialParams.identity(1)
    params.angles[0, axis] = 0.3
    out, _ = sp_mod.spatial_transform(x, None, params, shape, spacing)
    # output p samples input R·p, so the blob shows up at p0 = Rᵀ·q0
    r = sp_mod.rotation_matrix(params.angles).double()[0]
    expected = r.T @ q0
    torch.testing.assert_close(_centroid_mm(out, spacing), expected, rtol=0, atol=0.15)


def test_translation_and_scale_move_a_blob_where_expected():
    spacing = (1.0, 1.0, 1.0)
    shape = (32, 32, 32)
    q0 = torch.tensor([4.0, 2.0, -3.0], dtype=torch.float64)
    x = _blob(shape, q0.tolist(), spacing)
    params = sp_mod.SpatialParams.identity(1)
    params.translation[0] = torch.tensor([2.0, -3.0, 1.0])
    out, _ = sp_mod.spatial_transform(x, None, params, shape, spacing)
    torch.testing.assert_close(_centroid_mm(out, spacing), q0 - params.translation[0].double(), rtol=0,
                               atol=0.1)
    params = sp_mod.SpatialParams.identity(1)
    params.iso_scale[0] = 1.25  # sampling transform: > 1 zooms out, the blob moves towards the centre
    out, _ = sp_mod.spatial_transform(x, None, params, shape, spacing)
    torch.testing.assert_close(_centroid_mm(out, spacing), q0 / 1.25, rtol=0, atol=0.1)


def test_random_spatial_keeps_labels_integer_and_in_range():
    x, lab = _image(), _labels()
    for mode in ("paper", "linear", "nearest"):
        out, out_lab = sp_mod.random_spatial(x, lab, (16, 16, 20), (2.0, 2.0, 2.0), 0, label_mode=mode,
                                             num_classes=L, pad_value=-1.0)
        assert out.shape == (B, 1, 16, 16, 20) and out.dtype == torch.float32
        assert out_lab.shape == (B, 16, 16, 20) and out_lab.dtype == torch.int64
        assert 0 <= int(out_lab.min()) and int(out_lab.max()) < L
        assert torch.isfinite(out).all()


def test_padding_value_outside_the_input():
    x, lab = _image(), _labels()
    params = sp_mod.SpatialParams.identity(B)
    params.translation[:] = 1000.0  # far outside the input
    pad = torch.tensor([-3.0, 7.0])
    out, out_lab = sp_mod.spatial_transform(x, lab, params, (8, 8, 8), (1.0, 1.0, 1.0), pad_value=pad,
                                            num_classes=L)
    assert (out[0] == -3.0).all() and (out[1] == 7.0).all() and (out_lab == 0).all()


def test_elastic_displacement_is_bounded_and_smooth():
    params = sp_mod.sample_spatial_params(2, 0)
    assert params.control_points.shape == (2, 3, 8, 8, 8)
    assert float(params.control_points.abs().max()) <= 15.0
    disp = augment._common.bspline_upsample(params.control_points, (20, 24, 28))
    assert float(disp.abs().max()) <= 15.0
    assert float(disp.diff(dim=4).abs().max()) < 3.0  # mm per voxel across 5 cells of ~5.6 voxels
    # the sampled parameters respect SRCSM's ranges
    p = sp_mod.sample_spatial_params(500, 1)
    assert float((p.scale - 1).abs().max()) <= 0.1 and float((p.iso_scale - 1).abs().max()) <= 0.2
    assert float(p.angles.abs().max()) <= 0.35 and float(p.translation.abs().max()) <= 20.0


# ---------------------------------------------------------------------------------------- intensity


@pytest.mark.parametrize("modality,scale_range", [("CT", 0.2), ("MR", 0.4)])
def test_intensity_shift_scale_ranges(modality, scale_range):
    n = 400
    x = torch.zeros(n, 1, 1, 1, 2)
    x[..., 1] = 0.5
    out = augment.random_intensity(x, modality, 0)
    c = (out[..., 1] - out[..., 0]).flatten() / 0.5
    s = out[..., 0].flatten() / c
    assert float((c - 1).abs().max()) <= scale_range + 1e-5
    assert float((c - 1).abs().max()) > 0.9 * scale_range  # uniform over the full range
    assert float(s.abs().max()) <= 0.2 + 1e-5 and float(s.abs().max()) > 0.18


def test_intensity_clamps_per_modality():
    x = torch.linspace(-3, 5, 1000).view(1, 1, 10, 10, 10).repeat(8, 1, 1, 1, 1)
    ct = augment.random_intensity(x, "CT", 0)
    assert float(ct.min()) == -1.0 and float(ct.max()) == 1.0
    mr = augment.random_intensity(x, Normalization(type="mr_robust"), 0)
    assert float(mr.min()) == -1.0 and float(mr.max()) > 2.0  # MR: no upper clamp
    ct_norm = augment.random_intensity(x, Normalization(type="ct_window", window=(-125, 275)), 0)
    torch.testing.assert_close(ct_norm, ct)


# ----------------------------------------------------------------------------------------- registry


def test_registry_entry_point():
    assert set(augment.AUGMENTATIONS) == {"none", "src", "src_hard", "rcnet_global", "randconv", "gin",
                                          "gin_ipa"}
    x, lab = _image(n=12), _labels(n=12)
    lab_before = lab.clone()
    for name in augment.AUGMENTATIONS:
        out = augment.apply_appearance(name, x, lab, L, 0)
        again = augment.apply_appearance(name, x, lab, L, 0)
        views = out if isinstance(out, tuple) else (out,)
        views_again = again if isinstance(again, tuple) else (again,)
        assert len(views) == augment.num_views(name)
        for v, w in zip(views, views_again):
            assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
            torch.testing.assert_close(v, w, rtol=0, atol=0)  # same seed, same augmentation
    assert torch.equal(lab, lab_before)
    with pytest.raises(ValueError, match="unknown appearance augmentation"):
        augment.apply_appearance("mixup", x, lab, L, 0)
