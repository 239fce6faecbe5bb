"""PSA's random walk (Ahn & Kwak, CVPR 2018): CAMs spread along a learned pixel affinity.

A pixel's affinity to its neighbours within a radius (``W_ij = exp(−mean_c |f_i − f_j|)`` from
AffinityNet's features, 1 to itself, 0 beyond the radius) becomes a transition matrix
``T = A^∘β`` with each **column** summed to 1; the CAMs (background channel included, when the caller
includes it) walk ``t`` steps: ``vec(M) · T^t``. β sharpens the affinity (reference 8), t sets how
far scores travel (reference 256: PSA squares T eight times).

Two forms with the same result: dense (``[N, N]``, N = h·w; ``T^t`` by repeated squaring, any t by
binary exponentiation, fast on a GPU for VOC's 56² grids) and banded (each pixel's affinities to its
P neighbours ``[P, h, w]``, memory O(N·P) instead of O(N²), t sparse steps).

As a refiner (``random_walk``) it works on the probabilities [1 + K, H, W] of any CAM source, after
any CAM refiner (e.g. CAA then the walk): average-pooled to AffinityNet's grid, walked, upsampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.models.networks import network_from_state
from wsss_core.pairs import radius_offsets, shifted
from wsss_core.registry import REFINERS


def dense_affinity(pairs: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """The banded affinity as the dense matrix PSA builds: ``[B, P, h, w] -> [B, N, N]``, ones on the
    diagonal, ``A[i, j]`` the affinity of pixels i and j (row-major) within the radius, 0 beyond."""
    b, _, h, w = pairs.shape
    offsets = radius_offsets(radius)
    n = h * w
    ys, xs = torch.meshgrid(torch.arange(h, device=pairs.device), torch.arange(w, device=pairs.device), indexing="ij")
    dense = torch.zeros(b, n * n, dtype=pairs.dtype, device=pairs.device)
    for k, (dy, dx) in enumerate(offsets):
        ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        i = (ys * w + xs)[ok]
        j = ((ys + dy) * w + xs + dx)[ok]
        dense[:, i * n + j] = pairs[:, k][:, ok]
    dense = dense.view(b, n, n)
    return dense + torch.eye(n, dtype=pairs.dtype, device=pairs.device)


def transition(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """``T = A^∘β``, each column divided by its sum: ``[..., N, N] -> [..., N, N]``."""
    a = affinity.pow(beta)
    return a / a.sum(-2, keepdim=True)


def random_walk(cams: torch.Tensor, affinity: torch.Tensor, beta: float = 8.0, t: int = 256) -> torch.Tensor:
    """``vec(M) · T^t`` with the dense affinity.

    Args:
        cams: [K, h, w] or [B, K, h, w] (a background channel included when the caller includes it).
        affinity: [N, N] or [B, N, N], non-negative, N = h·w (row-major pixels).
        beta: the affinity's power (reference 8); t: steps (reference 256), any t ≥ 0.

    Returns:
        cams' shape.
    """
    if t < 0:
        raise ValueError(f"t must be ≥ 0, not {t}")
    m = cams.flatten(-2)  # [..., K, N]
    step = transition(affinity.to(m.dtype), beta)
    while t:  # binary exponentiation: T^t from T, T², T⁴, … (PSA's t = 2^logt is squarings then one product)
        if t & 1:
            m = m @ step
        t >>= 1
        if t:
            step = step @ step
    return m.view(cams.shape)


def random_walk_banded(cams: torch.Tensor, pairs: torch.Tensor, beta: float = 8.0, t: int = 256,
                       radius: int = 5) -> torch.Tensor:
    """:func:`random_walk` with the banded affinity: t steps of ``m_j ← Σ_i m_i T_ij``, O(K·N·P) each.

    Args:
        cams: [B, K, h, w].
        pairs: [B, P, h, w] from :func:`pair_affinity` (the pixel's affinity to itself is 1).

    Returns:
        [B, K, h, w].
    """
    if t < 0:
        raise ValueError(f"t must be ≥ 0, not {t}")
    offsets = radius_offsets(radius)
    a = pairs.to(cams.dtype).pow(beta)  # [B, P, h, w]: A_ij^β for j the pixel, i = j + offset
    colsum = 1 + a.sum(1, keepdim=True)  # [B, 1, h, w]
    weights = (a / colsum).unsqueeze(1)  # [B, 1, P, h, w]
    m = cams
    for _ in range(t):
        m = m / colsum + (shifted(m, offsets) * weights).sum(2)
    return m


DENSE_MAX = 4096
"""Grid cells up to which ``form="auto"`` walks with the dense matrix (N² floats: 64 MB at 4096)."""


@REFINERS.register("random_walk")
@dataclass
class RandomWalk:
    """PSA's random walk along a trained AffinityNet, as a refiner of probabilities [1 + K, H, W].

    Args:
        checkpoint: an AffinityNet checkpoint's contents (``affinitynet`` spec + ``model`` weights).
        beta: the affinity's power (reference 8); t: steps (reference 256).
        alpha: the walked background is ``(1 − max_k p_k)^alpha`` (PSA's, reference 16); ``None``
            walks the background the scores come with (the mask's background rule).
        radius: pairs within it on the feature grid (reference 5; as AffinityNet was trained).
        form: ``banded`` (O(N·P) memory, t steps) or ``dense`` (``[N, N]``, log t products); ``auto``:
            dense up to ``DENSE_MAX`` grid cells (VOC's 56² at stride 8), banded beyond.
        device: where the network and the walk run.

    ``affinity(images)`` is the expensive, setting-independent part (one network pass per image);
    a caller that has it (a sweep's cache) passes it as aux ``affinity`` and no network runs.
    """

    checkpoint: Mapping[str, Any] = field(repr=False)
    beta: float = 8.0
    t: int = 256
    alpha: float | None = 16.0
    radius: int = 5
    form: Literal["auto", "banded", "dense"] = "auto"
    device: str = "cpu"

    space: ClassVar[str] = "probs"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_image: ClassVar[bool] = True
    image_aux_inputs: ClassVar[tuple[str, ...]] = ("checkpoint", "radius")
    image_aux_keys: ClassVar[tuple[str, ...]] = ("affinity",)

    def __post_init__(self) -> None:
        if self.t < 0 or self.beta <= 0:
            raise ValueError(f"random_walk: t must be ≥ 0 and beta > 0 (got t={self.t}, beta={self.beta})")
        self.net = network_from_state(self.checkpoint, "affinitynet")[0].to(self.device)

    @classmethod
    def from_network(cls, net: torch.nn.Module, **settings: Any) -> RandomWalk:
        """The refiner on an AffinityNet in hand (scoring while it trains), on the network's device."""
        self = cls.__new__(cls)
        for f in fields(cls):
            setattr(self, f.name, settings.get(f.name, f.default))
        self.checkpoint, self.device, self.net = {}, str(next(net.parameters()).device), net
        return self

    @property
    def aux_keys(self) -> frozenset[str]:
        return frozenset()

    @torch.no_grad()
    def affinity(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 [H, W, 3] images of one size -> each one's pair affinity [P, h, w] on the feature grid."""
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).to(self.device)
        return list(self.net.affinity(self.net.normalize(x), self.radius))

    def image_aux(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The stage a sweep caches (:class:`wsss_core.types.StagedRefiner`): ``{"affinity": [P, h, w]}``."""
        return [{"affinity": a} for a in self.affinity(images)]

    def walk(self, probs: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """[1 + K, H, W] scores, [P, h, w] affinity -> walked scores [1 + K, H, W]."""
        size, grid = probs.shape[-2:], pairs.shape[-2:]
        scores = probs.float().to(pairs.device)
        if self.alpha is not None:
            scores = torch.cat([(1 - scores[1:].amax(0, keepdim=True)).clamp_min(0).pow(self.alpha), scores[1:]])
        m = F.adaptive_avg_pool2d(scores[None], grid)  # PSA: the CAM averaged over each feature cell
        if self.form == "dense" or (self.form == "auto" and grid[0] * grid[1] <= DENSE_MAX):
            m = random_walk(m, dense_affinity(pairs[None].float(), self.radius), self.beta, self.t)
        else:
            m = random_walk_banded(m, pairs[None].float(), self.beta, self.t, self.radius)
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0].to(probs.device)

    def __call__(self, maps: list[torch.Tensor], aux: Sequence[Mapping[str, torch.Tensor]],
                 images: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        pairs = [a.get("affinity") for a in aux]
        if any(p is None for p in pairs):
            if images is None:
                raise ValueError("random_walk needs the images (or their cached affinity)")
            pairs = self.affinity(images)
        return [self.walk(m, p.to(self.device)) for m, p in zip(maps, pairs, strict=True)]
