"""The Fréchet distance between two sets of features, each summarised as a Gaussian (FID, Heusel et al. 2017;
FVD, Unterthiner et al. 2018): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
symmetric positive semi-definite matrix with the same eigenvalues as S1 S2, in float64 with torch.linalg.eigh.
This is why it is not scipy.linalg.sqrtm, which pytorch-fid and StyleGAN-V call: sqrtm takes the square root of
the non-symmetric S1 S2 by a Schur decomposition, which returns complex values with small imaginary parts on
rank-deficient covariances (fewer clips than feature dimensions, the usual case for FVD's 400 and FID's 2048 at a
few hundred clips) that those codes then drop; the symmetric form has real eigenvalues by construction (negative
round-off is clamped to 0). The two agree to float64 round-off on full-rank inputs (tests/test_metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Gaussian:
    """The mean [D] and covariance [D,D] (float64) of `count` feature vectors."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> Gaussian:
        """features [N,D] -> their Gaussian (the unbiased covariance, as numpy.cov and the reference codes)."""
        x = features.detach().to("cpu", torch.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 feature vectors, got {tuple(x.shape)}")
        return cls(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]), len(x))


def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"features of different widths: {a.mean.shape[0]} and {b.mean.shape[0]}")
    root = sqrt_psd(a.cov)
    cross = torch.linalg.eigvalsh(root @ b.cov @ root).clamp(min=0).sqrt().sum()
    d = (a.mean - b.mean).square().sum() + a.cov.trace() + b.cov.trace() - 2 * cross
    return float(d.clamp(min=0))
