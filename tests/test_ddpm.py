"""Training objectives: DDPM schedules, forward process, targets and losses; flow shifts; loss weighting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import ddpm, flow
from sora_jax.diffusion.ddpm import DDPMObjective
from sora_jax.diffusion.flow import FlowObjective
from sora_jax.diffusion.weighting import loss_weight


def test_linear_and_cosine_schedules():
    lin = DDPMObjective(beta_schedule="linear")
    np.testing.assert_allclose(lin.betas()[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    cos = DDPMObjective(beta_schedule="cosine")
    ab = cos.alphas_cumprod().astype(np.float64)
    # Nichol & Dhariwal: abar(t) = f(t)/f(0), f(t) = cos^2(((t+1)/T + s)/(1 + s) pi/2) at the end of step t.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((t + 1) / 1000) / f(0) for t in range(1000)])
    np.testing.assert_allclose(ab[:900], expected[:900], rtol=1e-5)  # the beta cap only bites at the end
    assert cos.betas().max() == pytest.approx(0.999)
    for obj in (lin, cos):
        ab = obj.alphas_cumprod()
        assert ab.dtype == np.float32 and np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1


def test_schedules_match_diffusers():
    schedulers = pytest.importorskip("diffusers").schedulers
    for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
        ref = schedulers.DDPMScheduler(beta_schedule=theirs)
        obj = DDPMObjective(beta_schedule=ours)
        np.testing.assert_allclose(obj.betas(), ref.betas.numpy(), rtol=1e-6)
        np.testing.assert_allclose(obj.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-6)
        x0 = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
        noise = np.random.default_rng(1).standard_normal((3, 2, 4)).astype(np.float32)
        t = np.array([0, 500, 999])
        torch = pytest.importorskip("torch")
        np.testing.assert_allclose(
            obj.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
            ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy(), atol=1e-6)
        np.testing.assert_allclose(
            DDPMObjective(beta_schedule=ours, prediction="v_prediction").target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
            ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy(), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_forward_process_targets_and_inversion(prediction):
    obj = DDPMObjective(beta_schedule="cosine", prediction=prediction)
    kx, kn, kt = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(kx, (4, 3, 5))
    noise = jax.random.normal(kn, (4, 3, 5))
    t = obj.sample_timesteps(kt, 4)
    assert t.dtype == jnp.int32 and bool(jnp.all((t >= 0) & (t < 1000)))
    ab = jnp.asarray(obj.alphas_cumprod())[t][:, None, None]
    x_t = obj.add_noise(x0, noise, t)
    np.testing.assert_allclose(x_t, jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise, atol=1e-6)
    target = obj.target(x0, noise, t)
    if prediction == "v_prediction":
        np.testing.assert_allclose(target, jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0, atol=1e-6)
    # The exact target maps back to (x0, eps), and scores zero loss.
    x0_hat, eps_hat = ddpm.x0_and_eps(x_t, target, obj.alphas_cumprod()[np.asarray(t)], prediction)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-3)
    np.testing.assert_allclose(x0_hat[np.asarray(t) < 900], x0[np.asarray(t) < 900], atol=1e-3)
    np.testing.assert_allclose(obj.loss(target, x0, noise, t), 0.0, atol=1e-10)
    assert obj.loss(target + 1.0, x0, noise, t).shape == (4,)


def test_bad_objectives_are_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMObjective(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction"):
        DDPMObjective(prediction="sample")
    with pytest.raises(ValueError, match="weighting"):
        FlowObjective(weighting="p2")
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowObjective(timestep_sampling="cosmap")


def test_min_snr_and_truncated_snr_weights():
    snr = jnp.array([0.1, 1.0, 5.0, 50.0])
    g = 5.0
    # Hang et al.: eps -> min(snr, g)/snr, v -> min(snr, g)/(snr + 1).
    np.testing.assert_allclose(loss_weight(snr, "min_snr", "epsilon", g), jnp.minimum(snr, g) / snr, rtol=1e-6)
    np.testing.assert_allclose(loss_weight(snr, "min_snr", "v_prediction", g), jnp.minimum(snr, g) / (snr + 1), rtol=1e-6)
    np.testing.assert_allclose(loss_weight(snr, "truncated_snr", "epsilon"), jnp.maximum(snr, 1) / snr, rtol=1e-6)
    np.testing.assert_allclose(loss_weight(snr, "none", "flow"), 1.0)
    # Flow: the velocity MSE is the x0 MSE / sigma^2, so min-SNR weights it by min(snr, g) * sigma^2.
    sigma = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(loss_weight(flow.flow_snr(sigma), "min_snr", "flow", g),
                               jnp.minimum(flow.flow_snr(sigma), g) * sigma**2, rtol=1e-5)
    # Finite at the ends of the schedules.
    assert bool(jnp.all(jnp.isfinite(loss_weight(jnp.array([0.0, jnp.inf]), "truncated_snr", "flow"))))


def test_weighted_ddpm_loss():
    obj = DDPMObjective(prediction="epsilon", weighting="min_snr", snr_gamma=5.0)
    x0, noise = jnp.zeros((3, 4)), jnp.ones((3, 4))
    t = jnp.array([10, 500, 990])
    plain = DDPMObjective(prediction="epsilon").loss(jnp.zeros((3, 4)), x0, noise, t)
    np.testing.assert_allclose(plain, 1.0)
    snr = obj.snr(t)
    np.testing.assert_allclose(obj.loss(jnp.zeros((3, 4)), x0, noise, t), jnp.minimum(snr, 5.0) / snr, rtol=1e-6)


def test_flow_objective():
    obj = FlowObjective(shift=3.0, weighting="min_snr")
    sigma = obj.sample_sigmas(jax.random.key(0), 4096)
    assert bool(jnp.all((sigma > 0) & (sigma < 1)))
    # shift 3 moves the logit-normal median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert float(jnp.median(sigma)) == pytest.approx(0.75, abs=0.02)
    x0, noise = jnp.zeros((4, 2, 3)), jnp.ones((4, 2, 3))
    s = sigma[:4]
    np.testing.assert_allclose(FlowObjective().loss(noise - x0, x0, noise, s), 0.0)
    np.testing.assert_allclose(obj.loss(jnp.zeros_like(x0), x0, noise, s), obj.weight(s), rtol=1e-6)
    np.testing.assert_allclose(FlowObjective().loss(jnp.zeros_like(x0), x0, noise, s),
                               flow.flow_loss(jnp.zeros_like(x0), x0, noise), rtol=1e-6)


def test_resolution_and_dynamic_shift():
    base = flow.latent_tokens((21, 60, 104))
    assert base == 32760
    assert flow.resolution_shift(base) == pytest.approx(3.0)
    assert flow.resolution_shift(4 * base) == pytest.approx(6.0)  # sqrt(4) = 2
    with pytest.raises(ValueError):
        flow.resolution_shift(0)
    # Shifts compose multiplicatively, which is what makes the sqrt rule a rescaling of a reference shift.
    t = np.linspace(0.01, 0.99, 7)
    np.testing.assert_allclose(flow.shift_sigmas(flow.shift_sigmas(t, 2.0), 1.5), flow.shift_sigmas(t, 3.0), rtol=1e-12)
    assert flow.dynamic_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.dynamic_shift(4096) == pytest.approx(math.exp(1.15))


def test_dynamic_shift_matches_diffusers_time_shift():
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n = 1024
    mu = calculate_shift(n)
    t = torch.linspace(0.05, 1.0, 9, dtype=torch.float64)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, t)
    np.testing.assert_allclose(flow.shift_sigmas(t.numpy(), flow.dynamic_shift(n)), ref.numpy(), rtol=1e-12)
