"""Small fixed-point problems with known solutions, shared by the core tests."""
import torch


def real_spectrum_matrix(dim: int, rho: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A = Q diag(linspace(-rho, rho)) Q^T: symmetric, real spectrum, spectral radius rho."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    return q @ torch.diag(torch.linspace(-rho, rho, dim, dtype=dtype)) @ q.T


def linear_problem(dim: int, rho: float, batch: int = 4, seed: int = 0):
    """f(z) = A z + b per sample; returns (f, b, exact z*)."""
    a = real_spectrum_matrix(dim, rho, seed)
    b = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    return (lambda z: z @ a.T + b), b, exact


def tanh_problem(dim: int = 30, lipschitz: float = 0.9, batch: int = 4, seed: int = 0):
    """f(z) = tanh(A z + b), ||A||_2 = lipschitz < 1, so f is a contraction; z* by 2000 Picard steps."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a = lipschitz * a / torch.linalg.matrix_norm(a, 2)
    b = 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ a.T + b)  # noqa: E731
    z = torch.zeros(batch, dim, dtype=torch.float64)
    for _ in range(2000):
        z = f(z)
    return f, b, z
