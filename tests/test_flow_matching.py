import pytest
import torch

from shared.flow_matching import FlowMatchingConfig, euler_sample, euler_time_grid, interpolate, sample_time


def test_euler_reaches_exact_endpoint_of_linear_velocity_field():
    """dx/dt = x1 - x0 (constant) from x0: Euler is exact, any step count."""
    x0 = torch.randn(3, 64, 2)
    x1 = torch.randn(3, 64, 2)
    for steps in (1, 10, 7):
        out = euler_sample(lambda x, t: x1 - x0, x0, steps)
        torch.testing.assert_close(out, x1, rtol=0, atol=1e-5)


def test_euler_time_grid_and_time_dependent_field():
    """dx/dt = 2t: Euler on t_i = i/N gives sum 2 (i/N) (1/N) = (N-1)/N (up to fp32 rounding)."""
    seen = []

    def v(x, t):
        seen.append(t[0, 0, 0].item())
        return 2 * t.expand_as(x)

    out = euler_sample(v, torch.zeros(2, 64, 2), 10)
    assert seen == pytest.approx([i / 10 for i in range(10)], abs=1e-7)
    torch.testing.assert_close(out, torch.full((2, 64, 2), 0.9), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 7, 10, 16])
def test_euler_grid_is_the_released_linspace(n):
    """Times and steps exactly as the release: linspace(0, 1, n + 1) and its neighbour differences."""
    times, steps = euler_time_grid(n)
    ref = torch.linspace(0, 1, n + 1)
    assert times.dtype == steps.dtype == torch.float32
    assert torch.equal(times, ref[:-1]) and torch.equal(steps, ref[1:] - ref[:-1])
    if n == 10:  # the reason it matters: i/n and 1/n are not the release's values
        assert not torch.equal(steps, torch.full((n,), 1.0 / n))
        assert not torch.equal(times, torch.arange(n, dtype=torch.float32) * (1.0 / n))


def test_euler_sampler_passes_the_released_times_and_steps():
    """What the velocity sees and how x moves: t = linspace[i] as (B,1,1), x += (linspace[i+1]-linspace[i]) v."""
    seen = []
    x0 = torch.randn(3, 64, 2)
    bump = torch.randn(3, 64, 2)

    def v(x, t):
        seen.append(t.clone())
        return bump * (1 + t)

    out = euler_sample(v, x0, 10)
    ref_t = torch.linspace(0, 1, 11)
    x = x0
    for i in range(10):
        assert seen[i].shape == (3, 1, 1) and torch.equal(seen[i], ref_t[i].expand(3, 1, 1))
        x = x + (ref_t[i + 1] - ref_t[i]) * (bump * (1 + ref_t[i]))
    assert torch.equal(out, x)


def test_interpolation_and_target():
    x, eps = torch.randn(4, 64, 2), torch.randn(4, 64, 2)
    t = torch.rand(4, 1, 1)
    x_t, u = interpolate(x, eps, t)
    torch.testing.assert_close(x_t, t * x + (1 - t) * eps)
    torch.testing.assert_close(u, x - eps)
    # following the target velocity from x_t for (1 - t) lands on the data
    torch.testing.assert_close(x_t + (1 - t) * u, x, rtol=0, atol=1e-6)


def test_beta_time_sampler_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, FlowMatchingConfig(), g).flatten()
    assert t.min() >= 0 and t.max() <= 0.999
    # u ~ Beta(1.5, 1): E[u] = 0.6 -> E[t] = 0.999 * 0.4; P(t <= 0.999 (1 - q)) = 1 - q^1.5
    assert abs(t.mean().item() - 0.999 * 0.4) < 3e-3
    assert abs((t <= 0.999 * 0.5).float().mean().item() - (1 - 0.5**1.5)) < 3e-3
