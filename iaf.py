"""Normalizing-flow posteriors for the VAE: planar and radial flows, and Inverse Autoregressive Flow (IAF).

Rezende & Mohamed, "Variational Inference with Normalizing Flows", arXiv 1505.05770 (planar, radial flows,
the 2D energies U1-U4). Kingma et al., "Improving Variational Inference with Inverse Autoregressive Flow",
arXiv 1606.04934 (IAF). MADE masks: Germain et al., arXiv 1502.03509.
Slides: "Normalizing Flow (NF)" (planar, radial) and "Inverse Autoregressive Flow (IAF)".

The encoder's diagonal Gaussian q_0(z_0|x) = N(mu, diag sigma^2) is pushed through T invertible steps
z_t = f_t(z_{t-1}); the density of the result follows from the change of variables:

    log q(z_T|x) = log q_0(z_0|x) - sum_t log |det dz_t/dz_{t-1}|      (the IAF slide writes "+", true for the
                                                                       log-dets of the inverse maps dz_{t-1}/dz_t)
    ELBO = E_{z_0 ~ q_0}[log p(x|z_T) + log p(z_T) - log q(z_T|x)]     (Monte Carlo; the KL has no closed form)
    planar:  f(z) = z + u_hat h(w^T z + b), h = tanh,  log|det| = log|1 + u_hat^T h'(w^T z + b) w|
             u_hat = u + (m(w^T u) - w^T u) w / ||w||^2, m(a) = -1 + softplus(a)   (so w^T u_hat >= -1: invertible)
    radial:  f(z) = z + beta h(alpha, r)(z - z_ref), r = ||z - z_ref||, h = 1 / (alpha + r), alpha > 0, beta >= -alpha
             log|det| = (K - 1) log(1 + beta h) + log(1 + beta h + beta h' r)    (the slide drops the beta of h' r)
    IAF:     [m, s] = MADE_t(z_{t-1}, h), sigma = sigmoid(s),  z_t = sigma * z_{t-1} + (1 - sigma) * m,
             log|det| = sum_k log sigma_k           (m_k, s_k depend only on the z_j before k in step t's ordering)

Choices. Planar and radial parameters (u, w, b / z_ref, alpha, beta of every step) are amortized: the encoder
outputs them per example, as in Rezende & Mohamed. IAF: the encoder also outputs a context h that enters the
first hidden layer of every step's MADE (2 masked hidden layers, ELU), as in openai/iaf, and also every output
(m, s) through an unmasked linear map that starts at zero (not in openai/iaf, where m, s of the first variable in
each step's ordering are constants); the ordering is reversed between steps; the bias of s starts at
--sigma-bias (sigma ~ 0.82, near the identity). --length 0 is the diagonal-Gaussian VAE
of vae.py (analytic KL in training, same networks): the baseline the flows are compared with.

The 2D experiment of Rezende & Mohamed (--dataset u1..u4): q_0 = N(0, I) in 2D through T planar (or radial) steps
with free parameters, fit to p(z) = exp(-U(z)) / Z by minimising the (annealed) free energy
    F = E_{z_0 ~ q_0}[log q_0(z_0) - sum_t log|det| + beta_t U(z_T)],  beta_t = min(1, 0.01 + t / --anneal).
At beta = 1, F = KL(q || p) - log Z >= -log Z: the "KL bound" reported. log Z is integrated on a grid, so
KL(q || p) itself is reported too. U2-U4 depend on z_1 only through periodic/saturating terms, so exp(-U) has
infinite mass on R^2; as the paper's plots use [-4, 4]^2, we add a wall 0.5 ((|z_1| - 4)_+ / 0.2)^2 to every U
(negligible for U1) so that Z is finite. Simplification: Adam with a few thousand steps instead of the paper's
500k RMSprop updates; annealing over --anneal steps.

Presets: `fashion-mnist` is vae.py's small MLP (K = 32, 2 x 512 ReLU), 8-bit discretized-logistic likelihood,
with T = 4 IAF steps. `mnist` is Rezende & Mohamed's MNIST setting as we read it (binarized, K = 40, 2 x 400
hidden units - tanh instead of maxout -, planar T = 80, batch 100, RMSprop lr 1e-5 momentum 0.9, 500k updates,
beta_t = min(1, 0.01 + t / 10000), applied here as a weight on the KL term); not run here.

Run:
    python iaf.py                                        # fashion-mnist, IAF T = 4 (out: runs/iaf/fashion-mnist)
    python iaf.py --length 0 --out runs/iaf/fashion-mnist-T0   # the diagonal-Gaussian VAE, same networks
    python iaf.py --dataset u1 --flow planar --length 8  # 2D energy U1 -> runs/iaf/u1-planar8
    python iaf.py --figure assets/iaf_energies.png       # rows U1-U4: exp(-U), then q for T = 2, 8, 32

Results (2 CPU cores shared with other jobs, OMP_NUM_THREADS=1):
2D energies, `python iaf.py --dataset uN --flow planar --length T` for N = 1..4, T = 2, 8, 32 (the preset: 6000
Adam steps of 256 samples, lr 5e-3, beta_t annealed over 3000 steps; 20-31 s at T = 2, 31-40 s at T = 8, 94-134 s
at T = 32). KL(q || p) in nats, [the bound E_q[log q + U] >= -log Z from 200k samples], log Z on a grid:
              T = 2            T = 8            T = 32          log Z
      U1   0.746 [-1.131]   0.042 [-1.836]   0.017 [-1.860]    1.878
      U2   0.440 [-1.703]   0.173 [-1.970]   0.017 [-2.126]    2.143
      U3   1.081 [-1.622]   0.326 [-2.377]   0.101 [-2.602]    2.703
      U4   1.272 [-1.500]   0.411 [-2.360]   0.124 [-2.648]    2.772
  Radial, `python iaf.py --dataset u1 --flow radial --length 8 --steps 3000 --anneal 1500`: KL 0.201 nats.
  The densities (histograms of 1M samples): assets/iaf_energies.png, `python iaf.py --figure assets/iaf_energies.png`.
Fashion-MNIST (8-bit, discretized logistic; 8000 steps of batch 128, the preset; first 1000 test images; test
NLL = importance-sampled estimate with k = 1000; -ELBO = bound, the mean of the same 1000 log-weights; active units
from E_q[z_T|x]), seeds 0 / 1, one thread each, 440-596 s per run with the evaluation:
                         seed 0 / 1:  NLL              -ELBO            KL (nats)    active units
    python iaf.py --length 0             3.4719 / 3.4727  3.5282 / 3.5257  34.9 / 34.4  15 / 13   (diagonal q)
    python iaf.py                        3.4924 / 3.4922  3.5457 / 3.5487  31.4 / 29.5  25 / 29   (IAF, T = 4)
    python iaf.py --flow planar          3.4828 / 3.4753  3.5488 / 3.5325  35.2 / 35.5  32 / 32   (planar, T = 4)
  At this budget neither flow helps: the IAF is 0.020 bpd behind the diagonal q. Noise floor: vae.py (the same
  weights and batches as --length 0, parted by step 500) gives 3.4824; the IAF with its context-to-output map held
  at zero gives 3.4935 / 3.4876, the code before that map (commit e7d460f) 3.4935 for seed 0. Earlier single runs on
  another machine (IAF 3.479, diagonal 3.486, planar 3.484) ranked them the other way: differences of 0.01 bpd
  are ties.
"""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "iaf"
ENERGIES = ("u1", "u2", "u3", "u4")
BOX = 4.0  # energies: plots show [-BOX, BOX]^2; a wall keeps q inside |z_1| <= BOX


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    flow: str = common.choice("iaf", "planar", "radial")  # the flow that transforms q_0 (energies: planar | radial)
    length: int = 4  # T, flow steps (0 = diagonal-Gaussian VAE)
    latent: int = 32  # K, the dimension of z (energies: 2)
    hidden: int = 512  # MLP width of encoder and decoder
    layers: int = 2  # hidden layers of each MLP
    act: str = common.choice("relu", "tanh", "elu")  # activation of the encoder/decoder hidden layers
    context: int = 64  # IAF: size of the context h the encoder passes to every step
    made_hidden: int = 256  # IAF: width of the 2 masked hidden layers of each step's MADE
    sigma_bias: float = 1.5  # IAF: initial bias of s, so sigma = sigmoid(s) starts near 0.82
    anneal: int = 0  # steps of beta_t = min(1, 0.01 + t / anneal): energies weigh U, images the KL (0 = beta is 1)
    optimizer: str = common.choice("adam", "rmsprop")  # rmsprop uses momentum 0.9, as Rezende & Mohamed
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    eval_k: int = 1000  # images: importance samples per test example; energies: samples (x1000) for the KL bound
    figure: str = ""  # only write the combined U1-U4 figure from runs/iaf/u*-planar{2,8,32} to this PNG


PRESETS = {
    "fashion-mnist": dict(flow="iaf", length=4, latent=32, hidden=512, layers=2, act="relu", steps=8000, batch_size=128,
                          lr=1e-3, log_every=500, ckpt_every=2000, eval_n=1000, eval_k=1000),
    "mnist": dict(binarize=True, flow="planar", length=80, latent=40, hidden=400, layers=2, act="tanh", steps=500_000,
                  batch_size=100, lr=1e-5, optimizer="rmsprop", anneal=10000, log_every=1000, ckpt_every=20000,
                  eval_every=100_000, eval_k=5000),
    **{u: dict(flow="planar", length=8, latent=2, steps=6000, batch_size=256, lr=5e-3, anneal=3000, log_every=500,
               ckpt_every=2000, eval_k=200) for u in ENERGIES},
}


# ----------------------------------------------------------------------------- networks
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(d_in, d_out, hidden, layers, act):
    dims = [d_in] + [hidden] * layers
    blocks = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), ACTS[act]())]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], d_out))


# slide "Normalizing Flow", planar flow, with Rezende & Mohamed's (appendix A.1) constraint w^T u_hat >= -1
def planar_u_hat(u, w):
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True)  # m(a) = -1 + softplus(a)


# slide "Normalizing Flow": f(z) = z + u_hat h(w^T z + b), |det df/dz| = |1 + u_hat^T h'(w^T z + b) w|
def planar(z, u, w, b):
    """z (..., K); u, w (..., K), b (..., 1) broadcast against z. Returns f(z) and log|det df/dz| (...)."""
    u_hat, a = planar_u_hat(u, w), (w * z).sum(-1, keepdim=True) + b
    psi = (1 - torch.tanh(a).pow(2)) * w  # h'(w^T z + b) w
    return z + u_hat * torch.tanh(a), torch.log((1 + (u_hat * psi).sum(-1)).abs() + 1e-12)


# slide "Normalizing Flow": f(z) = z + beta h(alpha, r)(z - z_ref), h = 1 / (alpha + r),
# |det| = (1 + beta h)^(K-1) (1 + beta h + beta h'(alpha, r) r); alpha = softplus(.) > 0, beta = -alpha + softplus(.)
def radial(z, z_ref, alpha_raw, beta_raw):
    alpha = F.softplus(alpha_raw)
    beta = -alpha + F.softplus(beta_raw)  # beta >= -alpha keeps f invertible
    diff = z - z_ref
    r = diff.norm(dim=-1, keepdim=True)
    h = 1 / (alpha + r)
    log_det = (z.shape[-1] - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * r * h.pow(2))  # h' = -h^2
    return z + beta * h * diff, log_det.squeeze(-1)


class MaskedLinear(nn.Linear):
    def __init__(self, d_in, d_out, mask):
        super().__init__(d_in, d_out)
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step. A MADE with 2 masked hidden layers maps (z, h) to (m, s); input k has degree order[k] in
    1..K, hidden units degrees in 1..K-1, and output k sees a hidden unit only if its degree is < order[k]: so
    m_k, s_k depend only on the z_j with order[j] < order[k]. h enters unmasked twice: in the first hidden layer
    (as in openai/iaf) and through a linear map straight to (m, s), so that every output depends on h, as in the
    paper's [m, s] = AR-NN(z, h); without it, m, s of the first variable in the ordering (which sees no hidden
    unit) would be constants. That map starts at zero (no random draw): a fresh step is the MADE alone, as before.
    The official code has no such path (its first variable's m, s are biases only)."""

    def __init__(self, K, n_context, hidden, sigma_bias, reverse):
        super().__init__()
        order = torch.arange(K, 0, -1) if reverse else torch.arange(1, K + 1)  # the ordering of z in this step
        deg = torch.arange(hidden) % max(1, K - 1) + 1  # hidden degrees
        self.register_buffer("order", order)
        self.inp = MaskedLinear(K, hidden, deg[:, None] >= order[None, :])
        self.ctx = nn.Linear(n_context, hidden)
        self.mid = MaskedLinear(hidden, hidden, deg[:, None] >= deg[None, :])
        self.out = MaskedLinear(hidden, 2 * K, (order[:, None] > deg[None, :]).repeat(2, 1))  # rows: m then s
        self.ctx_out = nn.Parameter(torch.zeros(2 * K, n_context))  # h -> (m, s), unmasked; zero at the start
        with torch.no_grad():
            self.out.bias[K:] = sigma_bias  # sigma starts near 1: each step begins close to the identity

    # Kingma et al., Alg. 1: [m, s] = AutoregressiveNN[t](z_{t-1}, h) (slide "IAF": mu_{t,d}(z_{t-1,1:d-1}), h left out)
    def made(self, z, h):
        """z (..., B, K), h (B, n_h) -> m, s (..., B, K), in z's dtype (fp32 under autocast)."""
        a = F.elu(self.inp(z) + self.ctx(h))
        return (self.out(F.elu(self.mid(a))) + F.linear(h, self.ctx_out)).to(z.dtype).chunk(2, dim=-1)

    # slide "IAF": z_t = mu_t(z_{t-1}) + sigma_t(z_{t-1}) z_{t-1}, in the numerically stable form of Kingma et al.
    # (their Alg. 1): z_t = sigma * z_{t-1} + (1 - sigma) * m, sigma = sigmoid(s); log|det| = sum_k log sigma_k
    def forward(self, z, h):
        m, s = self.made(z, h)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(-1)


class FlowVAE(nn.Module):
    """Encoder -> q_0(z_0|x) = N(mu, diag exp(logvar)) and the flow's per-example parameters (planar, radial) or
    context h (IAF); T flow steps; prior p(z) = N(0, I); decoder p(x|z) as in vae.py."""

    def __init__(self, cfg, shape):
        super().__init__()
        self.shape, self.bernoulli, self.latent = tuple(shape), cfg.binarize, cfg.latent
        self.flow_type, self.length = cfg.flow, cfg.length
        C, H, W = self.shape
        K, T = cfg.latent, cfg.length
        self.n_out = 1 if cfg.binarize else 2  # Bernoulli logits | (logistic mean, log scale) per sub-pixel
        self.n_flow = 0 if T == 0 else {"planar": T * (2 * K + 1), "radial": T * (K + 2), "iaf": cfg.context}[cfg.flow]
        self.enc = nn.Sequential(nn.Flatten(), mlp(C * H * W, 2 * K + self.n_flow, cfg.hidden, cfg.layers, cfg.act))
        self.dec = nn.Sequential(mlp(K, self.n_out * C * H * W, cfg.hidden, cfg.layers, cfg.act), nn.Unflatten(1, (self.n_out * C, H, W)))
        n_iaf = T if cfg.flow == "iaf" else 0
        self.steps = nn.ModuleList(IAFStep(K, cfg.context, cfg.made_hidden, cfg.sigma_bias, reverse=t % 2 == 1) for t in range(n_iaf))

    def encode(self, x):
        """x in [0, 1] -> mu, logvar of q_0(z_0|x) and the flow's parameters / context (B, n_flow), in fp32."""
        out, K = self.enc(2 * x - 1), self.latent
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # fp32 (fp64 in the tests)
        return out[:, :K], out[:, K:2 * K], out[:, 2 * K:]

    def flow(self, z, params):
        """z_0 (..., B, K) -> z_T and sum_t log|det dz_t/dz_{t-1}| (..., B), in fp32."""
        log_det, K = torch.zeros(z.shape[:-1], device=z.device, dtype=z.dtype), self.latent
        if self.length == 0 or self.flow_type == "iaf":
            for step in self.steps:  # params is the context h (B, n_h)
                z, ld = step(z, params)
                log_det = log_det + ld
            return z, log_det
        per_step = params.view(len(params), self.length, -1)  # (B, T, 2K+1) planar | (B, T, K+2) radial
        for t in range(self.length):
            p = per_step[:, t]
            if self.flow_type == "planar":  # u, w, b
                z, ld = planar(z, p[:, :K], p[:, K:2 * K], p[:, 2 * K:])
            else:  # z_ref, alpha, beta (before their constraints)
                z, ld = radial(z, p[:, :K], p[:, K:K + 1], p[:, K + 1:])
            log_det = log_det + ld
        return z, log_det

    def log_px_z(self, x, z):
        """log p_theta(x|z) summed over all sub-pixels, (B,), in fp32."""
        out = self.dec(z).float()
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        mean, log_scale = out.chunk(2, dim=1)
        return discretized_logistic_log_prob(2 * x - 1, mean, log_scale).flatten(1).sum(1)

    def mean_image(self, z):
        out = self.dec(z).float()
        return torch.sigmoid(out) if self.bernoulli else ((out[:, : self.shape[0]] + 1) / 2).clamp(0, 1)

    def forward(self, x, beta=1.0):  # the training loss, so that DDP sees one forward
        return negative_elbo(self, x, beta)


class EnergyFlow(nn.Module):
    """Rezende & Mohamed's 2D experiment: q_0 = N(0, I) through T planar or radial steps with free parameters."""

    def __init__(self, flow, T, K=2):
        super().__init__()
        self.flow_type, self.latent = flow, K
        if flow == "planar":
            self.u, self.w = nn.Parameter(0.5 * torch.randn(T, K)), nn.Parameter(0.5 * torch.randn(T, K))
            self.b = nn.Parameter(torch.zeros(T, 1))
        else:
            self.z_ref = nn.Parameter(torch.randn(T, K))
            self.alpha_raw, self.beta_raw = nn.Parameter(torch.zeros(T, 1)), nn.Parameter(torch.zeros(T, 1))

    def forward(self, n):
        """n samples z_T (n, K) and their log q_T(z_T) (n,)."""
        params = (self.u, self.w, self.b) if self.flow_type == "planar" else (self.z_ref, self.alpha_raw, self.beta_raw)
        z = torch.randn(n, self.latent, device=params[0].device)
        log_q = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))  # log q_0(z_0)
        for p_t in zip(*params):  # step t's parameters
            z, log_det = (planar if self.flow_type == "planar" else radial)(z, *p_t)
            log_q = log_q - log_det  # change of variables
        return z, log_q


# ----------------------------------------------------------------------------- objective
# slide "VAE": KL(N(mu, sigma^2) || N(0, 1)) = -log sigma + sigma^2 / 2 + mu^2 / 2 - 1/2, per dimension
def kl_gaussian(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of 8-bit values x in [-1, 1] under a logistic discretized into their 256 bins (PixelCNN++),
    the edge bins extended to -inf / +inf; stable log(sigmoid(a) - sigmoid(b)) as in vae.py."""
    log_scale = log_scale.clamp(min=-7.0)
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    return torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), log_mid))


# slide "IAF": z_0 = mu + sigma * eps, z_T = f_T o ... o f_1(z_0),
# log q(z_T|x) = log q_0(z_0|x) - sum_t log|det dz_t/dz_{t-1}|
def posterior_sample(model, mu, logvar, params, eps):
    z_0 = mu + torch.exp(0.5 * logvar) * eps
    z_T, log_det = model.flow(z_0, params)
    return z_T, log_normal(z_0, mu, logvar) - log_det, log_det


# slide "VAE" with a flow posterior: -ELBO = -log p(x|z_T) + [log q(z_T|x) - log p(z_T)], one sample;
# at T = 0 the KL is the analytic one of vae.py. beta (annealing) weighs the KL; the reported -ELBO ignores it.
def negative_elbo(model, x, beta=1.0, eps=None):
    mu, logvar, params = model.encode(x)
    eps = torch.randn_like(mu) if eps is None else eps
    z_T, log_q, log_det = posterior_sample(model, mu, logvar, params, eps)
    recon = -model.log_px_z(x, z_T).mean()
    kl = kl_gaussian(mu, logvar).sum(1) if model.length == 0 else log_q - log_normal(z_T, torch.zeros_like(z_T), torch.zeros_like(z_T))
    loss = recon + beta * kl.mean()
    terms = {"loss": loss, "recon": recon, "kl": kl.mean(), "log_det": log_det.mean(),
             "au": (mu.var(0) > 0.01).sum()}  # of q_0's mean over the batch, cheap; evaluate counts from E_q[z_T|x]
    if not model.bernoulli:
        terms["bpd"] = common.bits_per_dim(recon + kl.mean(), math.prod(model.shape))
    return loss, terms


# slide "IWAE" estimator with the flow posterior: log p(x) ~= logsumexp_k [log p(x|z_T^k) + log p(z_T^k) - log q(z_T^k|x)] - log k
def log_px_importance(model, x, k, chunk=64):
    """(B,) estimates of log p(x) from k importance samples; (B,) the ELBO and the KL, as means over the same samples."""
    mu, logvar, params = model.encode(x)
    log_w, kl = [], []
    for i in range(0, k, chunk):
        c = min(chunk, k - i)
        z_T, log_q, _ = posterior_sample(model, mu, logvar, params, torch.randn(c, *mu.shape, device=mu.device))  # (c, B, K)
        log_px = model.log_px_z(x.expand(c, *x.shape).flatten(0, 1), z_T.flatten(0, 1)).view(c, -1)  # (c, B)
        kl.append(log_q - log_normal(z_T, torch.zeros_like(z_T), torch.zeros_like(z_T)))  # log q(z_T|x) - log p(z_T)
        log_w.append(log_px - kl[-1])
    log_w = torch.cat(log_w)
    return torch.logsumexp(log_w, dim=0) - math.log(k), log_w.mean(0), torch.cat(kl).mean(0)


# Burda et al. (arXiv 1509.00519): unit u is active if A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01; here z = z_T, the latent the
# decoder sees. E_q[z_T|x] by Monte Carlo through the flow: its noise adds E_x[Var_q(z_u|x)] / n to A_u (0.001 for a unit
# variance and n = 1000), far below the 0.01 threshold.
@torch.no_grad()
def posterior_mean(model, mu, logvar, params, n=1000, generator=None, chunk=100):
    """(B, K) E_q[z_T|x]: the mean of n samples z_T of q(z_T|x) (eps drawn from generator); mu itself at T = 0 (exact)."""
    if model.length == 0:
        return mu
    total = torch.zeros_like(mu)
    for i in range(0, n, chunk):
        eps = torch.randn(min(chunk, n - i), *mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)  # (c, B, K)
        total += posterior_sample(model, mu, logvar, params, eps)[0].sum(0)
    return total / n


# Rezende & Mohamed, Table 1: the four unnormalized 2D densities p(z) ~ exp(-U(z)), plus our wall on |z_1| > BOX
def energy(name, z):
    z1, z2 = z[..., 0], z[..., 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    gauss = lambda v, s: -0.5 * (v / s) ** 2  # log of an unnormalized 1D Gaussian bump
    if name == "u1":
        u = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2 - torch.logaddexp(gauss(z1 - 2, 0.6), gauss(z1 + 2, 0.6))
    elif name == "u2":
        u = 0.5 * ((z2 - w1) / 0.4) ** 2
    elif name == "u3":
        u = -torch.logaddexp(gauss(z2 - w1, 0.35), gauss(z2 - w1 + w2, 0.35))
    else:
        u = -torch.logaddexp(gauss(z2 - w1, 0.4), gauss(z2 - w1 + w3, 0.35))
    return u + 0.5 * (F.relu(z1.abs() - BOX) / 0.2) ** 2


# the annealed free energy of Rezende & Mohamed: F = E_q0[log q_0(z_0) - sum_t log|det| + beta_t U(z_T)]
def free_energy(model, name, n, beta=1.0):
    z_T, log_q = model(n)
    u = energy(name, z_T)
    loss = (log_q + beta * u).mean()
    return loss, {"loss": loss, "kl_bound": (log_q + u).mean(), "log_q": log_q.mean()}


def log_partition(name, lim=7.0, n=1401):
    """log Z = log int exp(-U) dz as a Riemann sum on an n x n grid over [-lim, lim]^2 (spacing 0.01), in fp64."""
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)  # (n, n, 2)
    return (torch.logsumexp(-energy(name, z).flatten(), 0) + 2 * math.log(g[1] - g[0])).item()


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device):
    """Ancestral sampling: z ~ p(z) = N(0, I), then the decoder's mean image (the flow is only in q)."""
    return model.mean_image(torch.randn(n, model.latent, device=device))


@torch.no_grad()
def reconstruct(model, x):
    mu, logvar, params = model.encode(x)
    return model.mean_image(model.flow(mu, params)[0])  # z_0 = mu pushed through the flow


def density_image(z, bins=100, lim=BOX):
    """A 2D histogram of samples z (n, 2) on [-lim, lim]^2 as an RGB image (3, bins, bins), z_2 upwards."""
    i = ((z + lim) / (2 * lim) * bins).floor().long()
    keep = ((i >= 0) & (i < bins)).all(1)
    h = torch.bincount(i[keep, 0] * bins + i[keep, 1], minlength=bins * bins).view(bins, bins).float()
    return shade(h.T.flip(0) / h.max().clamp_min(1))


def shade(v):
    """Values in [0, 1] (H, W) -> white-to-dark-blue RGB (3, H, W), in 32 levels (a small PNG)."""
    return 1 - (v[None] * 31).round() / 31 * torch.tensor([0.95, 0.75, 0.35])[:, None, None]


def target_image(name, bins=100, lim=BOX):
    g = (torch.arange(bins) + 0.5) / bins * 2 * lim - lim
    z = torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1)  # (bins, bins, 2): rows are z_2 from the top
    p = torch.exp(-energy(name, z))
    return shade(p / p.max())


@torch.no_grad()
def energy_figure(path, root=os.path.join("runs", METHOD), lengths=(2, 8, 32), n=1_000_000):
    """Rows U1..U4; columns exp(-U), then q_T for each T, from the checkpoints in <root>/<u>-planar<T>."""
    cells = []
    for name in ENERGIES:
        cells.append(target_image(name))
        for T in lengths:
            ckpt = common.load_checkpoint(os.path.join(root, f"{name}-planar{T}", "ckpt.pt"), (METHOD,))
            model = EnergyFlow("planar", T)
            common.load_model_state(model, ckpt["model"], f"{name}-planar{T}")
            cells.append(density_image(model(n)[0]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    common.save_grid(torch.stack(cells), path, nrow=1 + len(lengths))
    print(f"wrote {path} (rows U1-U4; columns exp(-U), q for T = {', '.join(map(str, lengths))})")


def save_images(model, x, out, step):
    model.eval()
    common.save_grid(sample(model, 64, x.device), out / f"samples_{step}.png")
    common.save_grid(torch.cat([x, reconstruct(model, x)]), out / f"recon_{step}.png", nrow=len(x))  # top: data
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Images: test NLL by importance sampling with cfg.eval_k samples of q(z_T|x) (an estimate), the -ELBO (a bound,
    the mean of the same log-weights), KL, and active units: Var_x(E_q[z_T|x]) > 0.01, E_q[z_T|x] the mean of 1000
    samples of q(z_T|x) from a generator seeded with 0 (the same count on every call); fp32; nats if binarized, else bits/dim.
    Energies (data is None): the KL bound E_q[log q + U] >= -log Z from eval_k x 1000 samples, log Z on a grid,
    and their sum KL(q || p)."""
    model.eval()
    if data is None:
        bound = torch.cat([free_energy(model, cfg.dataset, 100_000)[1]["kl_bound"][None] for _ in range(max(1, cfg.eval_k // 100))])
        log_z = log_partition(cfg.dataset)
        model.train()
        return common.eval_record(step, None, "nats", "bound", 100_000 * len(bound), kl_bound=bound.mean().item(),
                                  log_z=log_z, kl=bound.mean().item() + log_z, flow=cfg.flow, length=cfg.length)
    log_px, elbo, kl, means = [], [], [], []
    gen = torch.Generator(device=run.device).manual_seed(0)  # the samples of the active-unit count
    for x in common.test_batches(data, cfg, run.device, 100, f"importance-sampled NLL (k = {cfg.eval_k}), -ELBO, KL, active units"):
        lp, e, kl_x = log_px_importance(model, x, cfg.eval_k, chunk=max(1, 4000 // len(x)))
        log_px.append(lp)
        elbo.append(e)
        kl.append(kl_x)
        means.append(posterior_mean(model, *model.encode(x), n=1000, generator=gen))  # E_q[z_T|x] (B, K)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    means = torch.cat(means)
    return common.eval_record(step, to_unit(-torch.cat(log_px).mean().item()), "nats" if cfg.binarize else "bpd", "estimate",
                              len(means), k=cfg.eval_k, nelbo=to_unit(-torch.cat(elbo).mean().item()), nelbo_kind="bound",
                              kl_nats=torch.cat(kl).mean().item(), active_units=int((means.var(0) > 0.01).sum()), latent=model.latent,
                              flow=cfg.flow, length=cfg.length)


# ----------------------------------------------------------------------------- train
def make_optimizer(cfg, model, run):
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)


def anneal(cfg, step):  # Rezende & Mohamed: beta_t = min(1, 0.01 + t / 10000), here t / cfg.anneal
    return min(1.0, 0.01 + step / cfg.anneal) if cfg.anneal > 0 else 1.0


def train(cfg):
    if cfg.dataset in ENERGIES:
        return train_energy(cfg)
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"iaf.py models images or the energies {', '.join(ENERGIES)}; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = FlowVAE(cfg, data.shape).to(run.device)
    opt = make_optimizer(cfg, model, run)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    posterior = "diagonal Gaussian" if cfg.length == 0 else f"{cfg.flow} flow, T = {cfg.length}"
    run.print(f"VAE with {posterior} posterior ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, K = {cfg.latent}, "
              f"{'Bernoulli' if cfg.binarize else 'discretized logistic'} likelihood)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            with run.autocast():
                loss, terms = net(x, torch.full((), anneal(cfg, step), device=run.device))
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(model, fixed, run.out, step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        save_images(model, fixed, run.out, step)
        log.write(evaluate(model, data, cfg, run, step))
    return model


def save_density(model, name, out, step):
    with torch.no_grad():
        cells = torch.stack([target_image(name), density_image(model(200_000)[0])])
    common.save_grid(cells, out / f"density_{step}.png", nrow=2)  # left: exp(-U), right: q_T


def train_energy(cfg):
    """Fit q_T to exp(-U) by the annealed free energy; the batch is cfg.batch_size fresh samples of q_0."""
    run = common.setup(cfg, METHOD)
    if run.world > 1:
        common.fail(f"--dataset {cfg.dataset} trains in one process (a 2D flow has nothing to split); run it without torchrun")
    model = EnergyFlow(cfg.flow, cfg.length).to(run.device)
    opt = make_optimizer(cfg, model, run)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, update=update)
    log = common.Logger(cfg, run, step, update)
    run.print(f"{cfg.flow} flow, T = {cfg.length}, fit to exp(-U) of {cfg.dataset.upper()} (reverse KL)")
    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            loss, terms = free_energy(model, cfg.dataset, cfg.batch_size, anneal(cfg, step))
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, None, cfg, run, step))
            if common.every(step, cfg.ckpt_every):
                common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, update=update)
    common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, update=update)
    stop.exit_if_stopped(step)
    if step >= cfg.steps:
        save_density(model, cfg.dataset, run.out, step)
        log.write(evaluate(model, None, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def check(cfg):
    if cfg.length < 0:
        common.fail(f"--length {cfg.length} out of range; accepted: integers >= 0")
    if cfg.dataset in ENERGIES:
        if cfg.flow not in ("planar", "radial"):
            common.fail(f"--flow {cfg.flow} with the energy {cfg.dataset}: accepted: planar, radial (IAF needs an encoder context here)")
        if cfg.length < 1 or cfg.latent != 2:
            common.fail(f"--dataset {cfg.dataset} needs --length >= 1 and --latent 2 (got {cfg.length}, {cfg.latent})")
        if cfg.out == os.path.join("runs", METHOD, cfg.dataset):  # default folder: one per flow and length
            cfg.ckpt = cfg.ckpt if cfg.ckpt != os.path.join(cfg.out, "ckpt.pt") else ""
            cfg.out = f"{cfg.out}-{cfg.flow}{cfg.length}"
            cfg.ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    elif cfg.latent < 1 or cfg.context < 1 or cfg.made_hidden < 1:
        common.fail("--latent, --context and --made-hidden must be >= 1")
    return cfg


def main():
    cfg = check(common.parse_config(Config, PRESETS, METHOD, own_sets=ENERGIES))
    if cfg.figure:
        return energy_figure(cfg.figure)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    energy_run = cfg.dataset in ENERGIES
    model = (EnergyFlow(cfg.flow, cfg.length) if energy_run else FlowVAE(cfg, ckpt["shape"])).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t = time.time()
        x = (model(cfg.sample)[0] if energy_run else sample(model, cfg.sample, run.device)).cpu()
        dt = time.time() - t
        common.save_grid(density_image(x)[None] if energy_run else x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.0f} samples/s, "
              f"{f'{cfg.length} flow steps' if energy_run else '1 decoder evaluation'} each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        data = None if energy_run else common.load_data(cfg)
        common.Logger(cfg, run, 0).write(evaluate(model, data, cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
