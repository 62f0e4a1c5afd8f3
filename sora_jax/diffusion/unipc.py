"""UniPC multistep sampler for flow-prediction models, as Wan2.1 samples (Zhao et al. 2023, "UniPC").

Matches diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=shift)` with its defaults (predict_x0=True, solver_type="bh2", lower_order_final=True,
final_sigmas_type="zero"). In the flow parametrisation alpha_t = 1 - sigma_t and the log-SNR is
lambda_t = log(alpha_t) - log(sigma_t). Step i (sigma_i -> sigma_{i+1}) with model output v_i at x_i:
  1. x0 prediction m_i = x_i - sigma_i v_i (the "converted" model output, on the *uncorrected* x_i);
  2. corrector UniC (i > 0, unless i-1 is in disable_corrector): recompute x_i from the previous
     corrected sample and m_{i-1}, m_{i-2}, ... *and the new* m_i;
  3. predictor UniP of order p_i: x_{i+1} from the corrected x_i and m_i, m_{i-1}, ...
  p_i = min(order, i + 1) (warm-up), and with lower_order_final min(., num_steps - i), so the last
  step into sigma = 0 is first order (x_N = m_{N-1}).
`trajectory` records what diffusers' `step` returns: the predictor output x_{i+1}, which the next
step's corrector refines once the model has been evaluated there.
All UniP/UniC coefficients depend only on the sigma grid, so they are computed once in numpy
(float64, from diffusers' float32 sigmas) at trace time; the jitted loop only forms linear
combinations of the sample, the previous corrected sample and the history of x0 predictions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import flow
from sora_jax.diffusion.samplers import (
    LoopSampler,
    conditioned_end,
    conditioned_start,
    guided_prediction,
    holder,
    network_timesteps,
    scan_steps,
)


def _phi(h: float, order: int, solver_type: str) -> tuple[float, float, np.ndarray]:
    """h*phi_1, B(h) and the right-hand side b of UniPC's order conditions (diffusers' loop, predict_x0)."""
    hh = -h
    h_phi_1 = np.expm1(hh)  # e^{-h} - 1
    b_h = np.expm1(hh) if solver_type == "bh2" else hh
    h_phi_k = h_phi_1 / hh - 1.0
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, np.array(b)


def _update(grid: tuple[np.ndarray, np.ndarray, np.ndarray], src: int, dst: int, order: int,
            solver_type: str, corrector: bool) -> tuple[float, np.ndarray, float]:
    """Coefficients of one UniP (corrector=False) or UniC update from grid point src to dst.

    Returns (coefficient of the sample at src, coefficients of the x0 history [order] with index 0 the
    prediction at src and j the one j steps earlier, coefficient of the new prediction at dst (UniC)).
    """
    lam, sig, alpha = grid  # log-SNR, sigma and alpha = 1 - sigma at every grid point
    h = lam[dst] - lam[src]
    rks = np.array([(lam[src - j] - lam[src]) / h for j in range(1, order)] + [1.0])  # [order]
    h_phi_1, b_h, b = _phi(h, order, solver_type)
    r_mat = np.stack([rks ** (k - 1) for k in range(1, order + 1)])  # [order, order]
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
        rho_new, rhos_hist = rhos[-1], rhos[:-1]
    else:
        rho_new = 0.0
        if order == 1:
            rhos_hist = np.zeros(0)
        elif order == 2:
            rhos_hist = np.array([0.5])  # diffusers' "simplified" second-order predictor
        else:
            rhos_hist = np.linalg.solve(r_mat[:-1, :-1], b[:-1])
    a_t = alpha[dst]
    # x_dst = sig_dst/sig_src x_src - a_t h_phi_1 m_0
    #         - a_t B_h (sum_j rho_j (m_j - m_0)/r_j + rho_new (m_new - m_0))
    # Terms with a zero rho are left out rather than multiplied: into sigma = 0, B(h) = -h = -inf for
    # bh1, and diffusers' `-inf * 0` turns its last bh1 step into NaN; the limit is x_dst = m_0.
    hist = np.zeros(order)
    rho_sum = np.sum(rhos_hist / rks[:-1]) + rho_new
    hist[0] = -a_t * h_phi_1 + (a_t * b_h * rho_sum if rho_sum else 0.0)
    hist[1:] = -a_t * b_h * rhos_hist / rks[:-1]
    return sig[dst] / sig[src], hist, (-a_t * b_h * rho_new if rho_new else 0.0)


def unipc_coefficients(
    sigmas: np.ndarray,
    order: int = 2,
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
    solver_type: str = "bh2",
) -> dict[str, np.ndarray]:
    """Per-step UniC/UniP coefficients (float32) for a flow sigma grid [N + 1] ending at 0."""
    n = len(sigmas) - 1
    sig32 = np.asarray(sigmas, np.float32)
    alpha = (np.float32(1) - sig32).astype(np.float64)  # diffusers forms 1 - sigma in float32
    sig = sig32.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf at the final sigma = 0
        orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
        out = {k: np.zeros(s) for k, s in (("pred_x", n), ("pred_m", (n, order)), ("corr_keep", n),
                                            ("corr_x", n), ("corr_m", (n, order)), ("corr_new", n))}
        grid = (lam, sig, alpha)
        for i in range(n):
            p = orders[i]
            out["pred_x"][i], out["pred_m"][i, :p], _ = _update(grid, i, i + 1, p, solver_type, False)
            if i > 0 and (i - 1) not in disable_corrector:
                p = orders[i - 1]  # UniC at step i has the order of the predictor that produced x_i
                out["corr_x"][i], out["corr_m"][i, :p], out["corr_new"][i] = _update(grid, i - 1, i, p, solver_type, True)
            else:
                out["corr_keep"][i] = 1.0
    if not all(np.all(np.isfinite(v)) for v in out.values()):
        raise ValueError("UniPC coefficients are not finite for this grid: a multistep update into sigma = 0 "
                         "needs lower_order_final=True, and sigmas must lie strictly inside (0, 1) before the last")
    return {k: v.astype(np.float32) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class UniPCSampler(LoopSampler):
    """UniPC (B(h) variant, x0-predicting, with corrector) for flow models, with classifier-free guidance."""

    num_steps: int = 50
    guidance: float = 5.0
    shift: float = 3.0
    order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    schedule: str = "diffusers_unipc"
    latent_conditioning = True

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order}")
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unknown solver_type {self.solver_type!r}; use 'bh1' or 'bh2'")
        if self.schedule not in flow.FLOW_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {flow.FLOW_SCHEDULES}")
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))  # hashable

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Sigmas [num_steps + 1] (first one < 1, last 0) and model timesteps [num_steps]."""
        sigmas, timesteps = flow.flow_schedule(self.num_steps, self.shift, self.schedule)
        # log(1 - sigma) must stay finite at the first point (diffusers nudges its own grid the same way).
        sigmas[0] = min(sigmas[0], np.float32(1.0 - 1e-6))
        return sigmas, timesteps

    def sigmas(self) -> jax.Array:
        """The decreasing noise levels visited, num_steps + 1 of them, ending at 0."""
        return jnp.asarray(self.grid()[0])

    def _solve(self, denoiser, params, noise, cond, rng, keep, latent_cond=None):
        sigmas, timesteps = self.grid()
        k, x_start = conditioned_start(noise, latent_cond, sigmas)
        # SDEdit (k > 0) runs UniPC on the rest of the grid, warming its multistep history up afresh.
        sigmas, timesteps = sigmas[k:], timesteps[k:]
        c = unipc_coefficients(sigmas, self.order, self.lower_order_final, self.disable_corrector, self.solver_type)
        xs = {k: jnp.asarray(v) for k, v in c.items()} | {"sigma": jnp.asarray(sigmas[:-1]), "t": jnp.asarray(timesteps)}
        if latent_cond is not None:
            xs["sigma_next"] = jnp.asarray(sigmas[1:])
        held = holder(latent_cond, noise)

        def combine(w, hist):
            # Elementwise multiply-add, not einsum: a dot_general may run in bf16/TF32 passes on
            # TPU/GPU by default, far from float32 parity.
            return jnp.sum(w.reshape(-1, *([1] * (hist.ndim - 1))) * hist, axis=0)  # [K] x [K, *x] -> [*x]

        def step(carry, s):
            x_pred, last, hist = carry  # hist: [order, *x.shape], newest x0 prediction first
            v = guided_prediction(denoiser, params, x_pred, network_timesteps(latent_cond, s["t"]), cond, self.guidance)
            m = x_pred - s["sigma"] * v  # flow_prediction -> x0, on the uncorrected sample
            x = s["corr_keep"] * x_pred + s["corr_x"] * last + combine(s["corr_m"], hist) + s["corr_new"] * m
            x = held(x, s["sigma"])  # the corrector mixes old samples: re-hold the given cells
            hist = jnp.concatenate([m[None], hist[:-1]])  # push m_i: [order, *x.shape]
            x_next = s["pred_x"] * x + combine(s["pred_m"], hist)
            if latent_cond is not None:
                x_next = held(x_next, s["sigma_next"])
            return x_next, x, hist

        hist0 = jnp.zeros((self.order, *noise.shape), noise.dtype)  # [order, *x.shape]
        (x, _, _), traj = scan_steps(step, (x_start, x_start, hist0), xs, (lambda c: c[0]) if keep else None)
        return conditioned_end(x, traj, latent_cond)
