"""Samplers: exact on point-mass targets, guidance algebra, seeds, runtime step counts, one jitted loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import flow
from sora_jax.diffusion.ddim import DDIMSampler
from sora_jax.diffusion.ddpm import DDPMObjective
from sora_jax.diffusion.samplers import Conditioning, FlowSampler, make_flow_sampler
from sora_jax.diffusion.unipc import UniPCSampler, unipc_coefficients


@dataclasses.dataclass(frozen=True)
class PointMass:
    """Exact velocity field of data concentrated at `target` (conditional) or `-target` (null)."""

    target: float

    def __call__(self, params, x, t, text, text_mask):
        sigma = (t / flow.TIME_SCALE).reshape(-1, *([1] * (x.ndim - 1)))
        # text[:, 0, 0] is +1 for the prompt and -1 for the null prompt in these tests.
        c = self.target * text[:, 0, 0].reshape(sigma.shape)
        return (x - c) / sigma


@dataclasses.dataclass(frozen=True)
class DDPMPointMass:
    """Exact epsilon / v output of a DDPM model whose data sit at `target` * prompt scalar."""

    target: float
    objective: DDPMObjective

    def __call__(self, params, x, t, text, text_mask):
        ab = jnp.asarray(self.objective.alphas_cumprod())[t.astype(jnp.int32)].reshape(-1, *([1] * (x.ndim - 1)))
        c = self.target * text[:, 0, 0].reshape(ab.shape)
        eps = (x - jnp.sqrt(ab) * c) / jnp.sqrt(1 - ab)
        return eps if self.objective.prediction == "epsilon" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * c


@dataclasses.dataclass(frozen=True)
class Smooth:
    """A generic nonlinear model; asserts (at trace time) the batch it is called with."""

    batch: int | None = None

    def __call__(self, params, x, t, text, text_mask):
        if self.batch is not None:
            assert x.shape[0] == self.batch, f"denoiser called with batch {x.shape[0]}, expected {self.batch}"
        c = text[:, 0, 0].reshape(-1, *([1] * (x.ndim - 1)))
        tau = (t / 1000.0).reshape(c.shape)
        return jnp.sin(1.3 * x + 2.0 * tau + c) * (0.6 + 0.3 * c) + 0.5 * x * tau - 0.2 * c


def _cond(b, null=-1.0):
    ones = jnp.ones((b, 2, 3))
    mask = jnp.ones((b, 2), bool)
    return Conditioning(ones, mask, null * ones, mask)


SAMPLERS = {
    "euler": FlowSampler(num_steps=5, guidance=3.0, solver="euler"),
    "heun": FlowSampler(num_steps=5, guidance=3.0, solver="heun"),
    "unipc": UniPCSampler(num_steps=5, guidance=3.0),
    "ddim_eps": DDIMSampler(num_steps=5, guidance=3.0),
    "ddim_v_eta": DDIMSampler(num_steps=5, guidance=3.0, eta=0.5,
                              objective=DDPMObjective(beta_schedule="cosine", prediction="v_prediction")),
}


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_reaches_point_mass_exactly(solver):
    sampler = FlowSampler(num_steps=7, guidance=1.0, shift=3.0, solver=solver)
    noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 5))
    out = sampler(PointMass(0.5), None, noise, _cond(2))
    np.testing.assert_allclose(np.asarray(out), 0.5, atol=1e-4)


def test_unipc_reaches_point_mass():
    # The "linear" grid feeds t = 1000 sigma, so the point-mass velocity is exact (diffusers' grid
    # truncates t to integers, which the exact field would notice).
    sampler = UniPCSampler(num_steps=7, guidance=1.0, shift=3.0, schedule="linear")
    noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 5))
    np.testing.assert_allclose(np.asarray(sampler(PointMass(0.5), None, noise, _cond(2))), 0.5, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_reaches_point_mass(prediction, schedule):
    obj = DDPMObjective(beta_schedule=schedule, prediction=prediction)
    sampler = DDIMSampler(num_steps=8, guidance=1.0, objective=obj)
    noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    np.testing.assert_allclose(np.asarray(sampler(DDPMPointMass(0.5, obj), None, noise, _cond(2))), 0.5, atol=1e-4)


def test_guidance_extrapolates_between_conditional_and_null():
    # With v = v_u + g (v_c - v_u) on point masses at +c and -c, the result is (2g - 1) c.
    g = 3.0
    sampler = FlowSampler(num_steps=5, guidance=g, shift=1.0)
    noise = jax.random.normal(jax.random.key(1), (1, 2, 2, 2, 1))
    out = sampler(PointMass(0.25), None, noise, _cond(1))
    np.testing.assert_allclose(np.asarray(out), (2 * g - 1) * 0.25, atol=1e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guidance_one_is_the_conditional_run(name):
    sampler = SAMPLERS[name]
    noise = jax.random.normal(jax.random.key(2), (2, 3, 4, 5))
    rng = jax.random.key(7)
    # Guidance 1 calls the network once per step on the conditional batch only (the check runs at trace time)...
    g1 = dataclasses.replace(sampler, guidance=1.0)(Smooth(batch=2), None, noise, _cond(2), rng)
    # ...and equals a guided run whose negative prompt is the prompt itself (out_u + g * 0).
    same = sampler(Smooth(batch=4), None, noise, _cond(2, null=1.0), rng)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(same), atol=1e-6)
    # A real negative prompt changes the result.
    other = sampler(Smooth(), None, noise, _cond(2), rng)
    assert np.abs(np.asarray(other) - np.asarray(g1)).max() > 1e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_output_other_seed_differs(name):
    sampler = SAMPLERS[name]
    a = sampler.generate(Smooth(), None, (1, 2, 3, 4), _cond(1), seed=0)
    b = sampler.generate(Smooth(), None, (1, 2, 3, 4), _cond(1), seed=0)
    c = sampler.generate(Smooth(), None, (1, 2, 3, 4), _cond(1), seed=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_ddim_eta_uses_the_rng_and_eta_zero_does_not():
    noise = jax.random.normal(jax.random.key(0), (1, 2, 3, 4))
    stochastic = SAMPLERS["ddim_v_eta"]
    a = stochastic(Smooth(), None, noise, _cond(1), jax.random.key(1))
    b = stochastic(Smooth(), None, noise, _cond(1), jax.random.key(2))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    deterministic = dataclasses.replace(stochastic, eta=0.0)
    np.testing.assert_array_equal(np.asarray(deterministic(Smooth(), None, noise, _cond(1), jax.random.key(1))),
                                  np.asarray(deterministic(Smooth(), None, noise, _cond(1), jax.random.key(2))))
    with pytest.raises(ValueError, match="needs an rng"):
        stochastic(Smooth(), None, noise, _cond(1))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_step_count_is_a_runtime_field(name):
    noise = jax.random.normal(jax.random.key(3), (1, 2, 3, 4))
    trajs = {}
    for n in (3, 7):
        sampler = dataclasses.replace(SAMPLERS[name], num_steps=n)
        trajs[n] = np.asarray(sampler.trajectory(Smooth(), None, noise, _cond(1), jax.random.key(0)))
        assert trajs[n].shape == (n + 1, *noise.shape)
        np.testing.assert_array_equal(trajs[n][0], np.asarray(noise))
        np.testing.assert_allclose(trajs[n][-1], np.asarray(sampler(Smooth(), None, noise, _cond(1), jax.random.key(0))),
                                   atol=1e-6)
    assert np.abs(trajs[3][-1] - trajs[7][-1]).max() > 1e-4


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr including those of nested jaxprs (loop bodies, pjit, cond branches)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_eqns(inner)
    return n


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_whole_sampler_is_one_loop(name):
    noise = jnp.zeros((1, 2, 3, 4))
    sizes = []
    for n in (3, 12):
        sampler = dataclasses.replace(SAMPLERS[name], num_steps=n)
        jaxpr = jax.make_jaxpr(lambda x: sampler(Smooth(), None, x, _cond(1), jax.random.key(0)))(noise)
        assert "scan[" in str(jaxpr) and f"length={n}" in str(jaxpr).replace(" ", "")
        sizes.append(_count_eqns(jaxpr.jaxpr))
    # Unrolled steps would grow the program with num_steps; a loop does not.
    assert sizes[0] == sizes[1], sizes


def test_sigmas_are_decreasing_and_end_at_zero():
    for sampler in (FlowSampler(num_steps=10, shift=3.0), UniPCSampler(num_steps=10, shift=3.0),
                    FlowSampler(num_steps=10, shift=3.0, schedule="diffusers_euler")):
        s = np.asarray(sampler.sigmas())
        assert s[0] == pytest.approx(1.0, abs=1e-5) and s[-1] == 0.0 and len(s) == 11
        assert np.all(np.diff(s) < 0)


def test_all_steps_run_inside_one_loop():
    sampler = FlowSampler(num_steps=4, guidance=2.0)
    noise = jnp.zeros((1, 1, 2, 2, 1))
    jaxpr = jax.make_jaxpr(lambda n: sampler(PointMass(1.0), None, n, _cond(1)))(noise)
    text = str(jaxpr)
    # fori_loop with static bounds lowers to a scan of length num_steps, not 4 unrolled calls.
    assert "scan[" in text and "length=4" in text.replace(" ", ""), text[:2000]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown solver"):
        FlowSampler(solver="rk45")
    with pytest.raises(ValueError, match="unknown schedule"):
        FlowSampler(schedule="karras")
    with pytest.raises(ValueError, match="order"):
        UniPCSampler(order=4)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(num_steps=2000)
    with pytest.raises(ValueError, match="lower_order_final"):
        # A second-order step into sigma = 0 has no finite coefficients.
        unipc_coefficients(flow.flow_schedule(5, 3.0, "diffusers_unipc")[0], order=2, lower_order_final=False)


def test_make_flow_sampler():
    assert make_flow_sampler("unipc", num_steps=4, guidance=2.0, shift=5.0) == UniPCSampler(num_steps=4, guidance=2.0, shift=5.0)
    assert make_flow_sampler("heun", num_steps=4) == FlowSampler(num_steps=4, solver="heun")
    with pytest.raises(ValueError, match="unknown solver"):
        make_flow_sampler("dpm++")


def test_samplers_are_hashable_and_equal_by_value():
    assert hash(UniPCSampler(disable_corrector=[1, 2])) == hash(UniPCSampler(disable_corrector=(1, 2)))
    assert DDIMSampler(objective=DDPMObjective(beta_schedule="squaredcos_cap_v2")) == DDIMSampler(
        objective=DDPMObjective(beta_schedule="cosine"))


def test_flow_loss_zero_at_true_velocity():
    x0 = jnp.ones((2, 3))
    noise = jnp.full((2, 3), 2.0)
    np.testing.assert_allclose(flow.flow_loss(noise - x0, x0, noise), 0.0)
    xt = flow.add_noise(x0, noise, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(xt, [[1, 1, 1], [2, 2, 2]])
