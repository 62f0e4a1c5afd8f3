"""Flow-matching sampler: exact on a point-mass target, guidance algebra, one jit for all steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import flow
from sora_jax.diffusion.samplers import Conditioning, FlowSampler


@dataclasses.dataclass(frozen=True)
class PointMass:
    """Exact velocity field of data concentrated at `target` (conditional) or `-target` (null)."""

    target: float

    def __call__(self, params, x, t, text, text_mask):
        sigma = (t / flow.TIME_SCALE).reshape(-1, *([1] * (x.ndim - 1)))
        # text[:, 0, 0] is +1 for the prompt and -1 for the null prompt in these tests.
        c = self.target * text[:, 0, 0].reshape(sigma.shape)
        return (x - c) / sigma


def _cond(b):
    ones = jnp.ones((b, 2, 3))
    mask = jnp.ones((b, 2), bool)
    return Conditioning(ones, mask, -ones, mask)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_reaches_point_mass_exactly(solver):
    sampler = FlowSampler(num_steps=7, guidance=1.0, shift=3.0, solver=solver)
    noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 5))
    out = sampler(PointMass(0.5), None, noise, _cond(2))
    np.testing.assert_allclose(np.asarray(out), 0.5, atol=1e-4)


def test_guidance_extrapolates_between_conditional_and_null():
    # With v = v_u + g (v_c - v_u) on point masses at +c and -c, the result is (2g - 1) c.
    g = 3.0
    sampler = FlowSampler(num_steps=5, guidance=g, shift=1.0)
    noise = jax.random.normal(jax.random.key(1), (1, 2, 2, 2, 1))
    out = sampler(PointMass(0.25), None, noise, _cond(1))
    np.testing.assert_allclose(np.asarray(out), (2 * g - 1) * 0.25, atol=1e-4)


def test_sigmas_are_decreasing_and_end_at_zero():
    s = np.asarray(FlowSampler(num_steps=10, shift=3.0).sigmas())
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)


def test_all_steps_run_inside_one_loop():
    sampler = FlowSampler(num_steps=4, guidance=2.0)
    noise = jnp.zeros((1, 1, 2, 2, 1))
    jaxpr = jax.make_jaxpr(lambda n: sampler(PointMass(1.0), None, n, _cond(1)))(noise)
    text = str(jaxpr)
    # fori_loop with static bounds lowers to a scan of length num_steps, not 4 unrolled calls.
    assert "scan[" in text and "length=4" in text.replace(" ", ""), text[:2000]


def test_bad_solver_is_rejected():
    with pytest.raises(ValueError, match="unknown solver"):
        FlowSampler(solver="rk45")


def test_flow_loss_zero_at_true_velocity():
    x0 = jnp.ones((2, 3))
    noise = jnp.full((2, 3), 2.0)
    np.testing.assert_allclose(flow.flow_loss(noise - x0, x0, noise), 0.0)
    xt = flow.add_noise(x0, noise, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(xt, [[1, 1, 1], [2, 2, 2]])
