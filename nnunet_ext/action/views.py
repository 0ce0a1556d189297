"""Student views: photometric perturbations and CutMix/ClassMix (ACTION spec 4.1, 5.2, 11.7).

Teacher and student share the geometry of nnU-Net's augmented patch (weak teacher, strong student: fix of
official-code issue Q7). The student's extra perturbations act in nnU-Net's normalised intensity space. Random
numbers come from torch's global generator, whose state the trainer saves for exact resumption.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

MIXING_MODES = ("cutmix", "classmix", "none")


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    # drawn on the CPU generator (saved in checkpoints), then moved
    return (low + (high - low) * torch.rand(n)).to(device)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel of one sample ``[C, *S]`` (2D or 3D), sigma in voxels."""
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel_1d = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel_1d = (kernel_1d / kernel_1d.sum()).to(x.dtype)
    spatial = x.ndim - 1
    conv = {2: F.conv2d, 3: F.conv3d}[spatial]
    out = x.unsqueeze(1)  # channels as batch: [C, 1, *S]
    for axis in range(spatial):
        shape = [1, 1] + [1] * spatial
        shape[2 + axis] = kernel_1d.numel()
        padding = [0] * spatial
        padding[axis] = radius
        out = conv(out, kernel_1d.view(shape), padding=tuple(padding))
    return out.squeeze(1)


class StudentPerturbation:
    """Per-sample photometric perturbation of the student view, each operation with probability ``p``.

    Multiplicative brightness ``x U(brightness)``, contrast about the per-channel mean ``x U(contrast)`` and
    Gaussian blur with ``sigma ~ U(blur_sigma)`` voxels (the original: colour jitter and blur sigma in
    [0.15, 1.15], p = 0.5). Input and output ``[B, C, *S]``; the input is not modified.
    """

    def __init__(self, p: float = 0.5, brightness: tuple[float, float] = (0.75, 1.25),
                 contrast: tuple[float, float] = (0.75, 1.25), blur_sigma: tuple[float, float] = (0.15, 1.15)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"perturbation probability must be in [0, 1], got {p}")
        for name, (low, high) in (("brightness", brightness), ("contrast", contrast), ("blur_sigma", blur_sigma)):
            if not 0 < low <= high:
                raise ValueError(f"{name} range must satisfy 0 < low <= high, got ({low}, {high})")
        self.p, self.brightness, self.contrast, self.blur_sigma = p, brightness, contrast, blur_sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (4, 5):
            raise ValueError(f"expected [B, C, *S] with 2 or 3 spatial axes, got {tuple(x.shape)}")
        b, device = x.shape[0], x.device
        spatial_dims = tuple(range(2, x.ndim))
        view = (b,) + (1,) * (x.ndim - 1)
        apply = torch.rand(3, b) < self.p
        gain = _uniform(b, *self.brightness, device).view(view).to(x.dtype)
        out = torch.where(apply[0].to(device).view(view), x * gain, x)
        factor = _uniform(b, *self.contrast, device).view(view).to(x.dtype)
        mean = out.mean(dim=spatial_dims, keepdim=True)
        out = torch.where(apply[1].to(device).view(view), (out - mean) * factor + mean, out)
        sigmas = _uniform(b, *self.blur_sigma, torch.device("cpu"))
        blurred = [gaussian_blur(out[i], float(sigmas[i])) if apply[2, i] else out[i] for i in range(b)]
        return torch.stack(blurred)


def partner_indices(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Mixing partner of sample b: (b + 1) mod B (ReCo/ACTION)."""
    return (torch.arange(batch_size, device=device) + 1) % batch_size


def cutmix_keep_mask(shape: tuple[int, ...], depth_span: int = 20, device: torch.device | None = None
                     ) -> torch.Tensor:
    """Per-sample CutMix mask ``[B, *S]``: False inside one box (partner content), True elsewhere (own content).

    In-plane (last two axes, H x W): width ``w ~ U{W/2+1, ..., W-1}`` (clipped to at least 1), height
    ``round(H W / 2 / w)`` clipped to H, random position; so the box covers about half the plane. 3D: the box
    spans ``min(depth_span, D)`` slices of the first axis at a random offset (original: 20 slices).

    Args:
        shape: ``(B, H, W)`` or ``(B, D, H, W)``.
    """
    if len(shape) not in (3, 4):
        raise ValueError(f"expected (B, H, W) or (B, D, H, W), got {shape}")
    b, (h, w) = shape[0], shape[-2:]
    keep = torch.ones(shape, dtype=torch.bool)
    for i in range(b):
        low = w // 2 + 1
        box_w = int(torch.randint(low, w, ()).item()) if w > low else w
        box_w = max(1, min(box_w, w))
        box_h = max(1, min(h, int(round(h * w / 2 / box_w))))
        y0 = int(torch.randint(0, h - box_h + 1, ()).item())
        x0 = int(torch.randint(0, w - box_w + 1, ()).item())
        if len(shape) == 4:
            d = shape[1]
            span = min(depth_span, d)
            z0 = int(torch.randint(0, d - span + 1, ()).item())
            keep[i, z0:z0 + span, y0:y0 + box_h, x0:x0 + box_w] = False
        else:
            keep[i, y0:y0 + box_h, x0:x0 + box_w] = False
    return keep.to(device) if device is not None else keep


def classmix_keep_mask(pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ClassMix mask ``[B, *S]``: True on the voxels of floor(n/2) of the n pseudo-classes present in
    the sample (background counts, -1 does not), chosen at random; elsewhere the partner's content is used."""
    keep = torch.zeros_like(pseudo_labels, dtype=torch.bool)
    for i in range(pseudo_labels.shape[0]):
        present = torch.unique(pseudo_labels[i])
        present = present[present >= 0]
        n_keep = present.numel() // 2
        if n_keep == 0:
            continue
        chosen = present[torch.randperm(present.numel())[:n_keep].to(present.device)]
        keep[i] = torch.isin(pseudo_labels[i], chosen)
    return keep


def mix_with_partner(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``own * keep + partner * (1 - keep)`` for each tensor ``[B, ...spatial]`` or ``[B, C, ...spatial]``, with the
    same mask and partner ((b+1) mod B) for all of them (image, pseudo-label and confidence jointly)."""
    partner = partner_indices(keep.shape[0], keep.device)
    mixed = []
    for t in tensors:
        mask = keep if t.ndim == keep.ndim else keep.unsqueeze(1)
        if t.ndim != mask.ndim:
            raise ValueError(f"cannot mix tensor {tuple(t.shape)} with mask {tuple(keep.shape)}")
        mixed.append(torch.where(mask, t, t[partner]))
    return mixed
