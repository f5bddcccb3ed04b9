"""FFJORD: continuous normalizing flows with free-form dynamics and an unbiased trace estimator.

Chen et al., "Neural Ordinary Differential Equations", arXiv 1806.07366 (continuous normalizing flows, the
adjoint method). Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
Models", arXiv 1810.01367 (Hutchinson's trace estimator, multiscale image CNFs). Hutchinson (1989) for the estimator.
Slides: "4. Unbiased Estimation: FFJORD" (continuous normalizing flow, "backpropagation follows another ODE").

Instead of a stack of maps z_1 = f(z_0), a network defines a velocity field and the flow is its ODE. Data x = z(t0)
is carried to z(t1), which has the base density N(0, I); the log-density changes along the way by a trace:

    dz/dt = f(z(t), t; theta),   z(t1) = z(t0) + int_{t0}^{t1} f(z(t), t; theta) dt
    d log p(z(t))/dt = -Tr(df/dz(t))                      (instantaneous change of variables)
    log p(x) = log N(z(t1); 0, I) + int_{t0}^{t1} Tr(df/dz(t)) dt   (the slide's log p(z(t1)) = log p(z(t0)) -
                                                              int Tr dt, solved for the data end z(t0) = x)
    Tr(A) = E_eps[eps^T A eps],  E[eps] = 0, Cov[eps] = I   (Hutchinson; eps Gaussian or Rademacher, one eps per
                                                              solve; eps^T df/dz is one vector-Jacobian product)
    adjoint a(t) = dL/dz(t):  da/dt = -a^T df/dz,  dL/dtheta = int_{t0}^{t1} a^T df/dtheta dt   (solved backwards
                                                              from t1 to t0 together with z(t), from z(t1))

The state integrated is [z, Delta] with dDelta/dt = -Tr(df/dz), Delta(t0) = 0, so log p(x) = log N(z(t1)) - Delta(t1).
Sampling runs the ODE from t1 back to t0 from z(t1) ~ N(0, I), for z alone (no trace). Every ODE here is solved by
the adaptive Dormand-Prince 5(4) method written below: a step is accepted when the RMS of its error relative to
atol + rtol |y| is <= 1 for every tensor of the state (z, Delta; in the adjoint solve also a_z, a_Delta and each
parameter's a_theta), the max over tensors of torchdiffeq's mixed norm, so that no tensor's error hides among
another's entries. --grad adjoint differentiates with the adjoint ODE (memory independent of the number of steps),
--grad direct backpropagates through the solver's operations. NFE = network evaluations f(z, t); nfe_f per training
step, nfe_b for the adjoint solve (direct: 0 solver evaluations, the backward pass replays the recorded ones).

Learned end time (--learn-T, FFJORD's --train_T): each block's T = sqrt_end_time^2 is a parameter, initialised from
--time-length, and the block solves the same ODE on s = t / T in [0, 1], dz/ds = T f(z, T s), dDelta/ds =
-T Tr(df/dz): T is one more parameter of the dynamics for the adjoint and backpropagation alike (FFJORD passes [0, T]
to torchdiffeq instead). --no-learn-T: T fixed, t itself runs over [0, T] (older checkpoints load with it; with
--learn-T, common.load_model_state refuses them, naming sqrt_end_time). The log line and eval records show T.

Models. 2D toys: one CNF block (--blocks) whose f is an MLP of concatsquash layers, h = (W x + b) *
sigmoid(W_g t + b_g) + W_b t, tanh, T = 0.5 learned, exact trace (2 vector-Jacobian products: cheap in 2D, and no
estimator variance; --trace hutchinson gives the estimator).
Images: x in [0, 1] is dequantized, y = (255 x + u) / 256, u ~ U[0, 1), mapped by the logit transform
s = alpha + (1 - 2 alpha) y, v = logit(s), and v goes through CNF blocks of conv nets (concat layers: t is one more
input channel; 3x3 convs, softplus). --multiscale is FFJORD's ODE-NVP: at each scale blocks, a squeeze (C, H, W)
-> (4C, H/2, W/2), blocks, then half the channels are factored out to N(0, I); scales are added while H >= 4
(3 for 28 x 28). bits/dim of the 8-bit data: -log P(k) <= -log p(y) + D log 256 (dequantization: a bound).

Precision and host syncs: fp32 by default (--precision bf16|fp16 autocasts only f; solver, trace and log-densities
stay fp32: rtol 1e-5 is meaningless in bf16). The solver reads one number per attempted step (the error norm, to
accept the step and size the next): an inherent host sync; nothing else syncs but the Logger's line.

Deviations: --compile refused (the trace needs double backward); no regularizers, spectral or batch norm (off in FFJORD's scripts).
Presets: `toy` (every 2D set) is rtqichen/ffjord train_toy.py's defaults: f of 3 x 64 concatsquash layers, tanh,
1 block, T = 0.5 learned (--train_T True), exact trace (its brute_force divergence), dopri5 at rtol = atol = 1e-5,
batch 100, Adam lr 1e-3, weight decay 1e-5, 10000 steps. `mnist` is FFJORD's MNIST model (train_cnf.py with
README's flags: --multiscale, 2 blocks per group, 3 x 64-channel hidden concat conv layers (4 convs), softplus,
Rademacher probe, adjoint, T = 1 learned (--train_T True), batch 200, lr 1e-3 with 1000 warm-up steps, no weight
decay, rtol = atol = 1e-5, alpha 1e-6, 1000 epochs = 300k steps); paper: 0.99 bpd. `fashion-mnist` is our small
CPU demo, far from FFJORD's numbers: multiscale, 5 blocks of 2 x 16-channel concat convs, T = 1 fixed, rtol = atol
= 1e-3 (1e-4 in evaluation), Rademacher, --grad direct (1.6x faster than the adjoint on one core at this size),
batch 32, 300 steps. Other data sets (cifar10, folder:) take the Config defaults (T learned, as FFJORD's scripts).

Run:
    python ffjord.py --dataset 8gaussians               # 2D toy -> runs/ffjord/8gaussians (density_*.png, samples_*.png)
    python ffjord.py                                    # fashion-mnist, small multiscale CPU model
    python ffjord.py --dataset mnist --data-dir DIR     # FFJORD's MNIST model, on a GPU
    python ffjord.py --eval --ckpt runs/ffjord/moons/ckpt.pt        # exact test NLL (nats), NFE

Results (one core each, OMP_NUM_THREADS=1, 2 jobs on 2 cores: s/step approximate). 2D toys, `python ffjord.py
--dataset D --steps 2000 --batch-size 256` (the toy preset otherwise): exact test NLL on common's 10000 toy test
points, exact trace, rtol = atol = 1e-5; NFE = f evaluations per solve, train means (at the end):
      8gaussians    2.838 nats   0.59 s/step   NFE fwd 64 / adjoint 55 (75 / 67), eval 80, T 0.50 -> 0.96
      checkerboard  3.734 nats   0.37 s/step   NFE fwd 46 / adjoint 52 (72 / 75), eval 68, T 0.50 -> 1.00
      moons         2.417 nats   0.56 s/step   NFE fwd 58 / adjoint 73 (74 / 97), eval 74, T 0.50 -> 1.23
  Before the per-tensor norm and --learn-T (one RMS over the whole state, T fixed): 8gaussians 2.868 nats, NFE 62 / 33
  (69 / 37); checkerboard 3.750, 38 / 29 (56 / 38); moons 2.418, 46 / 37 (56 / 44): a looser adjoint solve than
  asked; the other toys: README (stale). Sampling z alone: 20000 points in 0.95 s, NFE 32 (3.24 s with the trace).
Fashion-MNIST, `python ffjord.py`, before the per-tensor norm (745 s): 4.397 bits/dim (dequantized bound, 200 test
  images, rtol 1e-4, eval NFE 112), 2.4 s/step, NFE 70 -> 82 (direct gradients); samples are blobs, not garments.
MNIST preset, before the per-tensor norm, one core, synthetic images (`--dataset mnist --data-dir /tmp/fake_mnist
  --steps 2`): 350 s and 335 s for steps 1, 2 of batch 200 (NFE 200 + 200 adjoint, 1.2 GB). Not run on a GPU.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "ffjord"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    precision: str = common.choice("fp32", "bf16", "fp16", "auto")  # fp32: the ODE needs it; bf16/fp16 autocast only the network f
    hidden: int = 64  # width of each hidden layer of f (units for 2D, channels for images)
    layers: int = 3  # hidden layers of f
    layer: str = common.choice("concatsquash", "concat")  # how t enters each layer of f
    act: str = common.choice("tanh", "softplus", "elu")  # activation of f
    blocks: int = 1  # CNF blocks in a row (with --multiscale: per group, two groups per scale but the last)
    multiscale: bool = False  # images: FFJORD's ODE-NVP (squeeze, blocks, factor out half, per scale)
    time_length: float = 0.5  # T: every block integrates t from 0 to T (with --learn-T: T's initial value)
    learn_T: bool = True  # learn each block's T = sqrt_end_time^2 (FFJORD's --train_T, True in both its scripts)
    rtol: float = 1e-5  # relative tolerance of the training solves
    atol: float = 1e-5  # absolute tolerance of the training solves
    eval_tol: float = 1e-5  # rtol = atol of the evaluation and sampling solves
    trace: str = common.choice("auto", "exact", "hutchinson")  # training trace: auto = exact in 2D, else Hutchinson
    eval_trace: str = common.choice("auto", "exact", "hutchinson")  # evaluation trace: auto = exact in 2D, else Hutchinson
    probe: str = common.choice("gaussian", "rademacher")  # Hutchinson's eps
    grad: str = common.choice("adjoint", "direct")  # adjoint ODE, or backpropagation through the solver steps
    alpha: float = 1e-6  # images: logit transform s = alpha + (1 - 2 alpha) y
    warmup: int = 0  # steps of linear learning-rate warm-up
    weight_decay: float = 0.0  # Adam's (L2) weight decay
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    max_solver_steps: int = 2000  # a solve taking more steps returns NaN (the training step is then skipped)


PRESETS = {
    "toy": dict(hidden=64, layers=3, layer="concatsquash", act="tanh", blocks=1, time_length=0.5, learn_T=True, rtol=1e-5,
                atol=1e-5, batch_size=100, lr=1e-3, weight_decay=1e-5, steps=10000, log_every=100, ckpt_every=1000),
    "fashion-mnist": dict(hidden=16, layers=2, layer="concat", act="softplus", blocks=1, multiscale=True, time_length=1.0,
                          learn_T=False, rtol=1e-3, atol=1e-3, eval_tol=1e-4, probe="rademacher", grad="direct", batch_size=32,
                          lr=1e-3, warmup=20, steps=300, log_every=10, ckpt_every=100, eval_n=200),
    "mnist": dict(hidden=64, layers=3, layer="concat", act="softplus", blocks=2, multiscale=True, time_length=1.0,
                  learn_T=True, rtol=1e-5, atol=1e-5, eval_tol=1e-5, probe="rademacher", grad="adjoint", batch_size=200, lr=1e-3,
                  warmup=1000, steps=300_000, log_every=100, ckpt_every=2000, eval_every=30_000),
}


# ----------------------------------------------------------------------------- the ODE solver
# Dormand & Prince (1980), RK5(4)7FM: nodes c, stages a, the 5th-order weights b (propagated; = the last row of a,
# so the 7th stage is f at the new point and is reused as the next step's 1st: "first same as last") and the
# difference of the 5th- and 4th-order weights, which estimates the local error.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9), (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DP_E = tuple(b5 - b4 for b5, b4 in zip(DP_A[6] + (0.0,), DP_B4))


def _axpy(y, h, coeffs, ks):  # y + h * sum_i coeffs[i] * ks[i], for each tensor of the state
    return [yj + h * sum(c * k[j] for c, k in zip(coeffs, ks) if c != 0) for j, yj in enumerate(y)]


def _norm(v, scale):
    """max over the tensors of the state of RMS(v_j / scale_j): torchdiffeq's _mixed_norm (misc.py; the adjoint's
    default norm in adjoint.py takes it over [y, a, each a_theta]). One RMS over the whole state would let the
    thousands of parameter-adjoint entries of the backward solve, or the D entries of z, hide the error of a few."""
    r = torch.stack([(a / s).detach().float().pow(2).mean().sqrt() for a, s in zip(v, scale) if a.numel()])
    return r.max().item()  # the solver's one host sync per attempted step


def _error_ratio(err, y0, y1, rtol, atol):  # <= 1 accepts the step: every tensor's error within atol + rtol max(|y0|, |y1|)
    return _norm(err, [atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y0, y1)])


def _initial_step(f, t0, y0, k0, direction, rtol, atol):
    """Hairer, Norsett & Wanner, "Solving ODEs I", II.4: a first step from the sizes of y0, f(y0) and f's change."""
    scale = [atol + rtol * y.abs() for y in y0]
    d0, d1 = _norm(y0, scale), _norm(k0, scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k1 = f(t0 + direction * h0, [y + direction * h0 * k for y, k in zip(y0, k0)])
    d2 = _norm([a - b for a, b in zip(k1, k0)], scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5(f, y0, t0, t1, rtol, atol, max_steps=2000):
    """Solve dy/dt = f(t, y) from t0 to t1 (either direction) for a list of tensors y; returns y(t1).
    Adaptive Dormand-Prince 5(4): a step is accepted if the RMS of its error estimate, relative to atol + rtol |y|,
    is <= 1 for every tensor of y (_norm); the next step is h * clamp(0.9 ratio^(-1/5), 0.2, 10). A non-finite error
    or more than max_steps attempts returns NaNs, so the caller's loss is non-finite and common.Update skips the step."""
    y, t = list(y0), float(t0)
    if t1 == t0:
        return y
    direction = 1.0 if t1 > t0 else -1.0
    k1 = f(t, y)
    h = _initial_step(f, t, y, k1, direction, rtol, atol)
    for _ in range(max_steps):
        last = abs(t1 - t) <= h * (1 + 1e-9)
        h_signed = (t1 - t) if last else direction * h
        ks = [k1]
        for i in range(1, 7):
            y_i = _axpy(y, h_signed, DP_A[i], ks)
            ks.append(f(t + DP_C[i] * h_signed, y_i))
        err = _axpy([torch.zeros_like(v) for v in y], h_signed, DP_E, ks)
        ratio = _error_ratio(err, y, y_i, rtol, atol)
        if not math.isfinite(ratio):
            break
        if ratio <= 1:  # accept: y_i is the 5th-order solution, ks[6] = f(t + h, y_i)
            y, k1, t = y_i, ks[6], (t1 if last else t + h_signed)
            if last:
                return y
        h = abs(h_signed) * min(10.0, max(0.2, 0.9 * ratio ** -0.2 if ratio > 0 else 10.0))
    return [torch.full_like(v, float("nan")) for v in y]


class AdjointSolve(torch.autograd.Function):
    """y(t1) = dopri5(f, y(t0)) without recording the steps; backward solves the adjoint ODE of Chen et al. (Alg. 1)
    from t1 back to t0 for the augmented state [y(t), a(t), a_theta(t)]:
        dy/dt = f(t, y),   da/dt = -a^T df/dy,   da_theta/dt = -a^T df/dtheta,   a(t1) = dL/dy(t1), a_theta(t1) = 0
    giving dL/dy(t0) = a(t0) and dL/dtheta = a_theta(t0); y(t) is recomputed backwards from y(t1). Its steps are
    controlled per tensor of the augmented state (_norm: each of y, a and every parameter's a_theta), as torchdiffeq's."""

    @staticmethod
    def forward(ctx, f, t0, t1, rtol, atol, max_steps, n, *y0_and_params):
        y0, params = y0_and_params[:n], y0_and_params[n:]
        with torch.no_grad():
            y1 = dopri5(f, y0, t0, t1, rtol, atol, max_steps)
        ctx.f, ctx.args, ctx.params = f, (t0, t1, rtol, atol, max_steps, n), params
        ctx.save_for_backward(*y1)
        return tuple(y1)

    @staticmethod
    def backward(ctx, *grad_y1):
        f, (t0, t1, rtol, atol, max_steps, n), params = ctx.f, ctx.args, ctx.params
        y1 = ctx.saved_tensors

        def augmented(t, s):
            y, a = s[:n], s[n:2 * n]
            with torch.enable_grad():
                y = [v.detach().requires_grad_(True) for v in y]
                dy = f(t, y)
                vjp = torch.autograd.grad(dy, y + list(params), a, allow_unused=True)  # a^T df/d[y, theta]
            vjp = [torch.zeros_like(v) if g is None else g for g, v in zip(vjp, y + list(params))]
            return [d.detach() for d in dy] + [-g for g in vjp]

        a1 = [torch.zeros_like(v) if g is None else g for g, v in zip(grad_y1, y1)]
        s0 = list(y1) + a1 + [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            s = dopri5(augmented, s0, t1, t0, rtol, atol, max_steps)
        return (None,) * 7 + tuple(s[n:2 * n]) + tuple(s[2 * n:])


def odeint(f, y0, t0, t1, rtol, atol, adjoint=False, max_steps=2000):
    """y(t1) for dy/dt = f(t, y), y(t0) = y0 (a list of tensors); gradients by the adjoint ODE or through the steps."""
    if adjoint and torch.is_grad_enabled():
        params = tuple(p for p in f.parameters() if p.requires_grad)
        return list(AdjointSolve.apply(f, t0, t1, rtol, atol, max_steps, len(y0), *y0, *params))
    return dopri5(f, y0, t0, t1, rtol, atol, max_steps)


# ----------------------------------------------------------------------------- networks
class ConcatSquash(nn.Module):
    """FFJORD's concatsquash layer: h = layer(x) * sigmoid(W_g t + b_g) + W_b t (layer: linear or 3x3 conv)."""

    def __init__(self, d_in, d_out, conv):
        super().__init__()
        self.layer = nn.Conv2d(d_in, d_out, 3, padding=1) if conv else nn.Linear(d_in, d_out)
        self.gate, self.bias = nn.Linear(1, d_out), nn.Linear(1, d_out, bias=False)
        self.conv = conv

    def forward(self, t, x):
        tt = t.reshape(1, 1).to(x.dtype)
        shape = (1, -1, 1, 1) if self.conv else (1, -1)
        return self.layer(x) * torch.sigmoid(self.gate(tt)).view(shape) + self.bias(tt).view(shape)


class Concat(nn.Module):
    """Concat layer: h = layer([x, t]), t entering as one more input (a constant channel for convs)."""

    def __init__(self, d_in, d_out, conv):
        super().__init__()
        self.layer = nn.Conv2d(d_in + 1, d_out, 3, padding=1) if conv else nn.Linear(d_in + 1, d_out)

    def forward(self, t, x):
        return self.layer(torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])], 1))


class ODEnet(nn.Module):
    """f(z, t; theta): hidden layers of width `hidden`, each taking t, activation between them, none at the end."""

    def __init__(self, d, hidden, layers, layer, act, conv):
        super().__init__()
        dims, cls = [d] + [hidden] * layers + [d], {"concatsquash": ConcatSquash, "concat": Concat}[layer]
        self.layers = nn.ModuleList(cls(a, b, conv) for a, b in zip(dims, dims[1:]))
        self.act = {"tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu}[act]

    def forward(self, t, z):
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            z = self.act(z) if i < len(self.layers) - 1 else z
        return z


# slide "FFJORD": Tr(df/dz), exactly (one vector-Jacobian product per dimension) ...
def trace_exact(dz, z, create_graph):
    dz_flat = dz.flatten(1)  # (B, D)
    rows = [torch.autograd.grad(dz_flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0].flatten(1)[:, i]
            for i in range(dz_flat.shape[1])]
    return torch.stack(rows, 1).sum(1)


# ... or by Hutchinson's estimator Tr(A) = E[eps^T A eps]: one vector-Jacobian product eps^T df/dz per evaluation
def trace_hutchinson(dz, z, eps, create_graph):
    eps_J = torch.autograd.grad(dz, z, eps, create_graph=create_graph, retain_graph=True)[0]
    return (eps_J * eps).flatten(1).sum(1)


def draw_probe(like, probe):
    """eps with E[eps] = 0, E[eps eps^T] = I: standard Gaussian, or Rademacher (+-1 with probability 1/2 each)."""
    if probe == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    return torch.randn_like(like)


class ODEfunc(nn.Module):
    """The dynamics of the state [z, Delta]: dz/dt = f(z, t), dDelta/dt = -Tr(df/dz); of the state [z] alone
    (sampling): dz/dt only, no trace. The Hutchinson probe eps is drawn once per solve (set_probe) and kept fixed over
    the solve, so the estimate is the integral of one smooth function (FFJORD); the adjoint pass reuses the same eps.
    A learned end time T (FFJORD's train_T: T = sqrt_end_time^2, a parameter) rescales time, t = T s with s in [0, 1]:
        dz/ds = T f(z, T s),   dDelta/ds = -T Tr(df/dz)
    so T is an ordinary parameter of the dynamics for the adjoint and for backpropagation. Counts evaluations in nfe."""

    def __init__(self, net, autocast=None, T_init=None):
        super().__init__()
        self.net, self.autocast = net, autocast
        self.trace, self.eps, self.nfe, self.learn_T = "exact", None, 0, T_init is not None
        if self.learn_T:  # T_init None: T fixed, no parameter, and t runs over [0, T] itself
            self.sqrt_end_time = nn.Parameter(torch.tensor(math.sqrt(T_init)))

    def set_probe(self, z, trace, probe):
        self.trace, self.eps = trace, (draw_probe(z, probe) if trace == "hutchinson" else None)

    def velocity(self, t, z):  # f(z, t), or T f(z, T s) with a learned T (t is then s)
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        T = self.sqrt_end_time ** 2 if self.learn_T else None
        tt = tt if T is None else T.to(z.dtype) * tt
        with self.autocast() if self.autocast else torch.autocast(z.device.type, enabled=False):
            dz = self.net(tt, z)
        dz = dz.float() if dz.dtype in (torch.float16, torch.bfloat16) else dz
        return dz if T is None else T.to(dz.dtype) * dz

    def forward(self, t, state):
        self.nfe += 1
        z, create_graph = state[0], torch.is_grad_enabled()  # no graph needed under no_grad / in the adjoint forward
        if len(state) == 1:  # [z] alone: sampling needs no trace (nor, under no_grad, a graph)
            return [self.velocity(t, z)]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.velocity(t, z)  # with a learned T, dz = T f, so the traces below are T Tr(df/dz)
            tr = trace_exact(dz, z, create_graph) if self.trace == "exact" else trace_hutchinson(dz, z, self.eps, create_graph)
        return [dz, -tr] if create_graph else [dz.detach(), -tr.detach()]


class CNF(nn.Module):
    """One continuous normalizing flow block: [z, Delta] from t = 0 to t = T (reverse: from T to 0); delta None: z
    alone (sampling). A learned T (learn_T): the same ODE solved over s = t / T from 0 to 1 (ODEfunc)."""

    def __init__(self, net, T, autocast=None, learn_T=False):
        super().__init__()
        self.func, self.T_fixed = ODEfunc(net, autocast, T if learn_T else None), T

    def end_time(self):  # T (learned: sqrt_end_time^2), a detached 0-d tensor on the parameters' device
        f = self.func
        return f.sqrt_end_time.detach() ** 2 if f.learn_T else torch.tensor(self.T_fixed, device=next(self.parameters()).device)

    def forward(self, z, delta, opts, reverse=False):
        state = [z] if delta is None else [z, delta]
        if delta is not None:
            self.func.set_probe(z, opts["trace"], opts["probe"])
        T = 1.0 if self.func.learn_T else self.T_fixed  # learned T: s runs over [0, 1]
        t0, t1 = (T, 0.0) if reverse else (0.0, T)
        state = odeint(self.func, state, t0, t1, opts["rtol"], opts["atol"], opts["grad"] == "adjoint", opts["max_steps"])
        return state[0], (state[1] if delta is not None else None)


def std_normal_log_prob(z):  # log N(z; 0, I), summed per example
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


class FlowModel(nn.Module):
    """2D: CNF blocks on R^2. Images: logit transform, then CNF blocks (single scale, or ODE-NVP's multiscale).
    log_prob(x) returns log p(x) (2D) or log p(y) of the dequantized y (images), per example, fp32."""

    def __init__(self, cfg, shape, autocast=None):
        super().__init__()
        self.shape, self.image, self.alpha, self.learn_T = tuple(shape), len(shape) == 3, cfg.alpha, cfg.learn_T
        self.opts = dict(rtol=cfg.rtol, atol=cfg.atol, trace=resolve_trace(cfg.trace, shape), probe=cfg.probe,
                         grad=cfg.grad, max_steps=cfg.max_solver_steps)
        block = lambda d: CNF(ODEnet(d, cfg.hidden, cfg.layers, cfg.layer, cfg.act, conv=self.image), cfg.time_length, autocast,
                              cfg.learn_T)
        # stages: ("cnf", ModuleList) | ("squeeze",) | ("factor",); built per scale as FFJORD's ODE-NVP
        self.stages, self.groups, c, h = [], nn.ModuleList(), shape[0], (shape[1] if self.image else 0)
        n_scales = 1
        if self.image and cfg.multiscale:
            n_scales, s = 0, h
            while s >= 4:
                n_scales, s = n_scales + 1, s // 2
        for scale in range(n_scales):
            self._group([block(c) for _ in range(cfg.blocks)])
            if scale < n_scales - 1:
                self.stages.append(("squeeze",))
                c *= 4
                self._group([block(c) for _ in range(cfg.blocks)])
                self.stages.append(("factor",))
                c //= 2

    def _group(self, cnfs):
        self.groups.append(nn.ModuleList(cnfs))
        self.stages.append(("cnf", len(self.groups) - 1))

    def nfe(self):
        return sum(m.func.nfe for m in self.modules() if isinstance(m, CNF))

    def end_time(self):  # the mean end time T over the CNF blocks (a detached tensor: no host sync)
        return torch.stack([m.end_time().float() for m in self.modules() if isinstance(m, CNF)]).mean()

    def flow(self, v, opts):
        """v -> the list of base-distributed parts z, and Delta = -int Tr(df/dz) dt summed over blocks."""
        z, delta, parts = v, torch.zeros(len(v), device=v.device, dtype=v.dtype), []
        for stage in self.stages:
            if stage[0] == "cnf":
                for cnf in self.groups[stage[1]]:
                    z, delta = cnf(z, delta, opts)
            elif stage[0] == "squeeze":
                z = squeeze(z)
            else:
                parts.append(z[:, : z.shape[1] // 2])
                z = z[:, z.shape[1] // 2:]
        return parts + [z], delta

    def inverse(self, parts, opts):
        """The base parts -> v, running every block from t = T back to 0 on z alone (sampling needs no Delta)."""
        z, parts = parts[-1], list(parts[:-1])
        for stage in reversed(self.stages):
            if stage[0] == "cnf":
                for cnf in reversed(self.groups[stage[1]]):
                    z, _ = cnf(z, None, opts, reverse=True)
            elif stage[0] == "squeeze":
                z = unsqueeze(z)
            else:
                z = torch.cat([parts.pop(), z], 1)
        return z

    def base_shapes(self):
        """Shapes of the factored-out parts and the final z, in the order flow() returns them."""
        c, h, shapes = self.shape[0], self.shape[1] if self.image else None, []
        for stage in self.stages:
            if stage[0] == "squeeze":
                c, h = c * 4, h // 2
            elif stage[0] == "factor":
                shapes.append((c // 2, h, h))
                c //= 2
        return shapes + [(c, h, h) if self.image else self.shape]

    def log_prob(self, x, opts=None):
        """log p(x) = log N(z(t1); 0, I) + int_{t0}^{t1} Tr(df/dz) dt = log N(z(t1)) - Delta(t1)  (2D: x itself;
        images: x is the dequantized y in [0, 1], and the logit transform adds its log-det)."""
        opts = opts or self.opts
        v, log_det = logit_transform(x, self.alpha) if self.image else (x, 0.0)
        parts, delta = self.flow(v, opts)
        self.int_trace = -delta.detach().mean()  # the flow's log-det size, for the log line
        return sum(std_normal_log_prob(p) for p in parts) - delta + log_det

    def forward(self, x):  # the training loss, so that DDP sees one forward
        return nll_loss(self, x)


def resolve_trace(trace, shape):
    return trace if trace != "auto" else "exact" if math.prod(shape) <= 2 else "hutchinson"


def squeeze(z):  # (B, C, H, W) -> (B, 4C, H/2, W/2): each 2 x 2 patch becomes 4 channels
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(z):  # (B, 4C, H/2, W/2) -> (B, C, H, W), the inverse of squeeze
    B, C4, h, w = z.shape
    return z.view(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)


# RealNVP/FFJORD preprocessing: s = alpha + (1 - 2 alpha) y, v = logit(s); log|dv/dy| = log(1 - 2 alpha) - log s - log(1 - s)
def logit_transform(y, alpha):
    s = alpha + (1 - 2 * alpha) * y
    v = torch.log(s) - torch.log1p(-s)
    log_det = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return v, log_det


def inverse_logit(v, alpha):
    return ((torch.sigmoid(v) - alpha) / (1 - 2 * alpha)).clamp(0, 1)


def dequantize(x, generator=None):
    """x = k / 255 in [0, 1] -> y = (k + u) / 256, u ~ U[0, 1)^D: a density of y bounds the probability of k."""
    u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device).to(x.device)
    return (x * 255 + u) / 256


# ----------------------------------------------------------------------------- objective
# slide "FFJORD": maximum likelihood, loss = -E_x log p(x) with log p(x) of the CNF (nats in 2D); images: bits/dim
# of the dequantized data, -log p(y) / (D log 2) + 8 (= dequantized_bpd), the quantity FFJORD trains on
def nll_loss(model, x):
    before = model.nfe()
    if model.image:
        log_p = model.log_prob(dequantize(x))
        bpd = common.dequantized_bpd(log_p, math.prod(model.shape)).mean()
        loss, terms = bpd, {"loss": bpd, "bpd": bpd}
    else:
        log_p = model.log_prob(x)
        loss = -log_p.mean()
        terms = {"loss": loss, "nll": loss}
    terms["int_trace"], terms["nfe_f"] = model.int_trace, model.nfe() - before  # int Tr(df/dz) dt: the log-det
    return loss, terms


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device, tol=1e-5, generator=None):
    """z(t1) ~ N(0, I), then every CNF block run from t = T back to 0 (images: and the inverse logit transform).
    Returns the samples and the NFE of the solve."""
    opts = {**model.opts, "rtol": tol, "atol": tol}
    before = model.nfe()
    parts = [torch.randn((n, *s), generator=generator).to(device) if generator is not None else torch.randn((n, *s), device=device)
             for s in model.base_shapes()]
    v = model.inverse(parts, opts)
    return (inverse_logit(v, model.alpha) if model.image else v), model.nfe() - before


LIM = 4.0  # toy pictures show [-LIM, LIM]^2


def shade(v):
    """Values in [0, 1] (H, W) -> white-to-dark-blue RGB (3, H, W)."""
    return 1 - v[None] * torch.tensor([0.95, 0.75, 0.35], device=v.device)[:, None, None]


def grid_points(n, lim):
    g = (torch.arange(n) + 0.5) / n * 2 * lim - lim
    return torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1).reshape(-1, 2), (2 * lim / n) ** 2  # rows: z_2 from the top


@torch.no_grad()
def density_grid(model, n=200, lim=LIM, tol=1e-5, trace="exact", chunk=20000):
    """log p on an n x n grid over [-lim, lim]^2 (n, n), exact trace by default, and the cell area."""
    pts, area = grid_points(n, lim)
    opts = {**model.opts, "rtol": tol, "atol": tol, "trace": trace}
    device = next(model.parameters()).device
    log_p = torch.cat([model.log_prob(p.to(device), opts) for p in pts.split(chunk)])
    return log_p.view(n, n), area


def histogram_image(z, bins=200, lim=LIM):
    i = ((z + lim) / (2 * lim) * bins).floor().long()
    keep = ((i >= 0) & (i < bins)).all(1)
    h = torch.bincount(i[keep, 0] * bins + i[keep, 1], minlength=bins * bins).view(bins, bins).float()
    return shade(h.T.flip(0) / h.max().clamp_min(1))


def save_toy_pictures(model, cfg, out, step, n=20000):
    """density_<step>.png: the heat map exp(log p) on [-4, 4]^2; samples_<step>.png: a histogram of n samples."""
    model.eval()
    log_p, _ = density_grid(model, tol=cfg.eval_tol)
    p = log_p.exp()
    common.save_grid(shade(p / p.max())[None].cpu(), out / f"density_{step}.png")
    x, _ = sample(model, n, next(model.parameters()).device, cfg.eval_tol)
    common.save_grid(histogram_image(x.cpu())[None], out / f"samples_{step}.png")
    model.train()


def save_image_samples(model, cfg, out, step, n=64):
    model.eval()
    x, _ = sample(model, n, next(model.parameters()).device, cfg.eval_tol)
    common.save_grid(x, out / f"samples_{step}.png")
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test NLL at rtol = atol = cfg.eval_tol. 2D: nats per point with the exact trace (kind "exact", up to the
    solver's tolerance). Images: bits/dim of the 8-bit data from one seeded dequantization per image, -log p(y)
    + D log 256, an upper bound on -log P(k) ("bound"); with the Hutchinson trace the log-density itself is an
    unbiased one-probe estimate. NFE: mean evaluations of f per test batch (all blocks)."""
    model.eval()
    trace = resolve_trace(cfg.eval_trace, model.shape)
    opts = {**model.opts, "rtol": cfg.eval_tol, "atol": cfg.eval_tol, "trace": trace}
    gen, log_p, nfe, t0 = torch.Generator().manual_seed(4321), [], [], time.time()
    for x in common.test_batches(data, cfg, run.device, 1000 if model.image else 5000, f"NLL by ODE solves ({trace} trace, tol {cfg.eval_tol:g})"):
        before = model.nfe()
        log_p.append(model.log_prob(dequantize(x, gen) if model.image else x, opts))
        nfe.append(model.nfe() - before)
    model.train()
    log_p, extras = torch.cat(log_p), dict(nfe=sum(nfe) / len(nfe), trace=trace, tol=cfg.eval_tol, eval_s=time.time() - t0,
                                           T=model.end_time().item())
    if not torch.isfinite(log_p).all():
        common.fail(f"evaluation: {int((~torch.isfinite(log_p)).sum())} non-finite log-densities (a solve exceeded --max-solver-steps?)")
    if model.image:
        bpd = common.dequantized_bpd(log_p, math.prod(model.shape)).mean().item()
        return common.eval_record(step, bpd, "bpd", "bound", len(log_p), dequantization="uniform, 1 sample, 8-bit",
                                  **extras, trace_kind="exact" if trace == "exact" else "unbiased estimate (1 probe)")
    return common.eval_record(step, -log_p.mean().item(), "nats", "exact", len(log_p), **extras)


# ----------------------------------------------------------------------------- train
def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr


def train(cfg):
    data = common.load_data(cfg)
    if data.kind not in ("image", "toy"):
        common.fail(f"ffjord.py models images or 2D toys; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = FlowModel(cfg, data.shape, run.autocast if run.dtype else None).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    o = model.opts
    run.print(f"FFJORD: {len(model.stages)} stages, {sum(len(g) for g in model.groups)} CNF blocks, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, {o['trace']} trace"
              f"{' (' + o['probe'] + ')' if o['trace'] == 'hutchinson' else ''}, {o['grad']} gradients, "
              f"rtol {o['rtol']:g} atol {o['atol']:g}, T {model.end_time().item():.4g} ({'learned' if cfg.learn_T else 'fixed'})")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    def pictures():
        (save_image_samples if model.image else save_toy_pictures)(model, cfg, run.out, step)

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss, terms = net(x)
            opt.zero_grad(set_to_none=True)
            before = model.nfe()
            update(loss)
            terms["nfe_b"] = model.nfe() - before  # adjoint solve; 0 with --grad direct
            if cfg.learn_T:
                terms["T"] = model.end_time()  # the learned end time after this step (mean over the blocks)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                pictures()
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        pictures()
        log.write(evaluate(model, data, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def check(cfg):
    for name in ("hidden", "blocks", "max_solver_steps"):
        if getattr(cfg, name) < 1:
            common.fail(f"--{name.replace('_', '-')} {getattr(cfg, name)} out of range; accepted: integers >= 1")
    if cfg.layers < 0:
        common.fail(f"--layers {cfg.layers} out of range; accepted: integers >= 0")
    if cfg.weight_decay < 0:
        common.fail(f"--weight-decay {cfg.weight_decay} out of range; accepted: >= 0")
    for name in ("rtol", "atol", "eval_tol", "time_length"):
        if not getattr(cfg, name) > 0:
            common.fail(f"--{name.replace('_', '-')} {getattr(cfg, name)} out of range; accepted: > 0")
    if not 0 < cfg.alpha < 0.5:
        common.fail(f"--alpha {cfg.alpha} out of range; accepted: 0 < alpha < 0.5")
    if cfg.binarize:
        common.fail("--binarize is not supported: ffjord.py models 8-bit images by dequantization (bits/dim) or 2D toys")
    if cfg.compile:
        common.fail("--compile is not supported: the trace needs double backward, which torch.compile does not support")
    if cfg.warmup < 0:
        common.fail(f"--warmup {cfg.warmup} out of range; accepted: integers >= 0")
    return cfg


def main():
    cfg = check(common.parse_config(Config, PRESETS, METHOD))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = FlowModel(cfg, ckpt["shape"], run.autocast if run.dtype else None).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t = time.time()
        x, nfe = sample(model, cfg.sample, run.device, cfg.eval_tol)
        dt = time.time() - t
        common.save_grid(x if model.image else histogram_image(x.cpu())[None], run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.0f} samples/s, NFE {nfe} for the batch, "
              f"rtol = atol = {cfg.eval_tol:g}) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
