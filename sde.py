"""Score-based generative modelling through SDEs: a score network s_theta(x, t) trained by continuous-time denoising score
matching, sampled by reverse-SDE predictor-corrector samplers or the probability-flow ODE (also the exact likelihood, encoding).

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic Differential Equations",
arXiv 2011.13456 (the SDEs, PC sampling, the probability-flow ODE, DDPM++ / NCSN++); Song, Durkan, Murray & Ermon, arXiv 2101.09258
(the likelihood weighting lambda = g^2); Dormand & Prince 1980 (the ODE solver); Hutchinson 1989 (the trace estimator).
Slides: "Score matching through SDE" and its appendix (NCSN / DDPM as discretizations, Algorithms 2 and 3, the ODE, Table 2).

Forward SDE dx = f(x, t) dt + g(t) dw, t in [0, 1], with a Gaussian kernel p_0t(x(t) | x(0)) = N(m(t) x(0), std(t)^2 I):
    VE      f = 0,               g = sigma(t) sqrt(2 log(sigma_max / sigma_min)),  sigma(t) = sigma_min (sigma_max / sigma_min)^t,
            m = 1, std = sigma(t); NCSN: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z
    VP      f = -beta(t) x / 2,  g = sqrt(beta(t)),  beta(t) = beta_min + t (beta_max - beta_min),  m = exp(-1/2 int_0^t beta),
            std = sqrt(1 - m^2); DDPM: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z
    sub-VP  f as VP,  g = sqrt(beta(t) (1 - m(t)^4)),  m as VP,  std = 1 - m^2
Reverse SDE dx = [f - g^2 grad_x log p_t(x)] dt + g dw_bar; probability-flow ODE dx = [f - g^2 grad_x log p_t(x) / 2] dt.
Objective (continuous DSM): E_t lambda(t) E_x(0) E_x(t)|x(0) 1/2 ||s_theta(x(t), t) - grad log p_0t(x(t) | x(0))||^2, t ~ U(eps, 1),
    grad log p_0t = -z / std, lambda = std^2 (the slide's; `--weighting sigma2`) or g^2 (`likelihood`: the DSM part of a bound on -log p).
Samplers: PC sampling (Algorithm 2 VE, 3 VP): a predictor (reverse diffusion: x' = x - f_i x + G_i^2 s + G_i z, the discretized
    reverse SDE; or Euler-Maruyama) from t_{i+1} to t_i, then M Langevin corrector steps x += e s + sqrt(2 e) z, e = 2 alpha_i
    (r ||z|| / ||s||)^2 (r the signal-to-noise ratio); the ODE by adaptive Dormand-Prince 5(4).
Likelihood: log p_eps(x) = log p_1(x(1)) + int_eps^1 div(f - g^2 s / 2) dt along the ODE, the divergence exact (2D) or by
    Hutchinson's eps^T (d drift / dx) eps with one Rademacher probe per solve; images in bits/dim of the 8-bit data.

As the official code (yang-song/score_sde_pytorch): the network predicts -std s (VP, sub-VP; labels 999 t, sinusoidal) or
sigma s (VE, "scale_by_sigma"; labels log sigma(t), Gaussian Fourier features of scale 16); VE's kernel std is sigma(t), so
x(0) counts as the data plus N(0, sigma_min^2) (the SDE's own kernel from x(0): std sqrt(sigma(t)^2 - sigma_min^2)); the loss
is 1/2 the sum over pixels, or (`--reduce-mean`, DDPM++ cont.) the mean without the 1/2; t ~ U(1e-5, 1); images as k/255 (not
dequantized in training), in [-1, 1] for VP (`centered`), in [0, 1] for VE, the network always sees [-1, 1]; DDPM++ / NCSN++'s
U-Net of BigGAN-type residual blocks (GroupNorm of min(C / 4, 32) groups, SiLU, resampling inside the block, (skip + h) / sqrt 2,
zero-initialised last convolutions, Xavier-uniform elsewhere), attention at 16 x 16; Adam (0.9, 0.999, eps 1e-8), warm-up 5000
steps, gradient clipping 1, EMA 0.9999 (VP) / 0.999 (VE); samplers end at t = 1e-3 (VP, sub-VP) / 1e-5 (VE); the likelihood
from t = 1e-5 at rtol = atol = 1e-5 on test data dequantized as (k + u) / 256, a Rademacher probe.
Differences: no FIR resampling, no progressive input (NCSN++ has both, DDPM++ neither); attention's q, k, v at Xavier scale 1
(official 0.1); PC sampling in the slides' order (predictor to t_i, then the corrector at t_i; official: corrector first) on the
grid t_i = eps + i (1 - eps) / N (official: dt = -1/N); VP's beta_i = 1 - m(t_i)^2 / m(t_{i-1})^2, so the chain's marginals are
the SDE's at every t_i (official: linspace(beta_min / N, beta_max / N), the same to first order); sub-VP's Langevin alpha_i is
VP's; `--denoise`: no noise in the last predictor step (the official noise_removal) and no corrector after it; the ODE sampler
does not denoise; the solver's error is normed per tensor of the state [x, log p] (the official scipy RK45: one norm over all).
Why the bpd cannot fall below 0: the ODE carries the prior to a density p_eps on R^D (at t = eps, not 0: the eps of the time
integral, 1e-5), evaluated at y = (k + u) / 256, always dequantized; by Jensen E_u -log p_eps(y) + D log 256 >= -log P(k) >= 0
for any density, up to the solver's error and the Hutchinson noise (unbiased, averaged over the test examples).
Presets: `fashion-mnist` (CPU): a 4x narrower U-Net (32 channels, 1 block per resolution, 1.26M parameters), 2500 steps x 64,
EMA 0.999, N = 100 Euler-Maruyama steps, the ODE at rtol = atol = 1e-4, the NLL on 100 test images; `toy` (2D): an MLP 3 x 256
(VE: no corrector); `cifar10`: DDPM++ cont. (VP; `--sde subvp`: DDPM++ cont. sub-VP) or, with `--sde ve`, NCSN++ cont. (reverse
diffusion + Langevin, snr 0.16); VE on fashion-mnist: sigma_max 28 = sqrt(784) (NCSNv2's technique 1; not measured).

Run:
    python sde.py                                      # fashion-mnist, VP: training, then bpd (ODE), FD of PC samples
    python sde.py --dataset 8gaussians --sde ve        # 2D: nats per point (exact trace), MMD of samples
    python sde.py --eval --sampler ode                 # FD and network evaluations of the probability-flow ODE sampler
    python sde.py --sample 64 --predictor reverse --corrector langevin --interpolate 4

Results (2 CPU cores, one thread per job, two jobs at once; README has the tables and commands):
    `python sde.py`: 2500 steps at 1.4-1.6 it/s (alone on 2 threads: 3.0), 33 min wall; exact test NLL 3.351 bpd (first 100 test
    images, standard error 0.086, 205 evaluations per solve); FD 25.56, IS-like 5.99 (250 samples, Euler-Maruyama N 100);
    at 100 samples FD 53.0 (N 100), 49.8 (N 300), 58.7 (reverse + Langevin, 199 evaluations), 97.7 (ODE, 133 evaluations).
    `python sde.py --dataset 8gaussians`: 2.864 nats (the data's own NLL 2.818), MMD^2 0.00052 (test vs test 0.00006);
    `--sde ve` 2.848 nats; checkerboard 3.662 (entropy 3.466). The cifar10 presets: not yet measured.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "sde"
LIM = 4.0  # 2D pictures show [-LIM, LIM]^2


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    sde: str = common.choice("vp", "ve", "subvp")  # the forward SDE
    beta_min: float = 0.1  # VP, sub-VP: beta(0)
    beta_max: float = 20.0  # VP, sub-VP: beta(1)
    sigma_min: float = 0.01  # VE: sigma(0)
    sigma_max: float = 50.0  # VE: sigma(1) (about the largest distance between training images)
    weighting: str = common.choice("sigma2", "likelihood")  # lambda(t) = std(t)^2 (the slide's) or g(t)^2
    reduce_mean: bool = False  # the loss a mean over dimensions (DDPM++ cont.), not 1/2 their sum
    t_eps: float = 1e-5  # training times t ~ U(t_eps, 1)
    centered: bool = True  # images as 2x - 1 in [-1, 1] (VP, sub-VP); else in [0, 1] (VE)
    dequantize: bool = False  # training images (k + u) / 256 (official: off, k / 255)
    channels: int = 128  # U-Net base width nf
    ch_mult: str = "1,2,2,2"  # U-Net width multipliers per resolution
    res_blocks: int = 4  # residual blocks per resolution
    attn_res: str = "16"  # resolutions with self-attention ('' = none)
    dropout: float = 0.1  # dropout in the residual blocks
    hidden: int = 256  # 2D network: hidden units
    layers: int = 3  # 2D network: hidden layers
    ema: float = 0.9999  # EMA decay of the weights used for evaluation and sampling (0 = none)
    warmup: int = 5000  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # max gradient norm (0 = none)
    hflip: bool = False  # random horizontal flips of training images
    sampler: str = common.choice("pc", "ode")  # predictor-corrector (reverse SDE) or the probability-flow ODE
    predictor: str = common.choice("euler", "reverse", "none")  # PC: Euler-Maruyama, reverse diffusion, or none (corrector only)
    corrector: str = common.choice("none", "langevin")  # PC: the corrector
    N: int = 1000  # PC: steps from t = 1 to sample_eps
    M: int = 1  # PC: corrector steps per predictor step
    snr: float = 0.16  # Langevin corrector: the signal-to-noise ratio r
    denoise: bool = True  # PC: no noise in the last predictor step, no corrector after it
    sample_eps: float = 0.0  # samplers end at this t (0 = 1e-3 for VP / sub-VP, 1e-5 for VE)
    lik_eps: float = 1e-5  # likelihood and encoding: the ODE from t = lik_eps to 1
    rtol: float = 1e-5  # ODE solver: relative tolerance
    atol: float = 1e-5  # ODE solver: absolute tolerance
    trace: str = common.choice("auto", "hutchinson", "exact")  # likelihood divergence (auto: exact on 2D data, else Hutchinson)
    lik_n: int = 0  # test examples for the likelihood (0 = all of eval_n)
    interpolate: int = 0  # with --sample: also encode this many test pairs and decode 8 points between their latents
    grid: int = 64  # samples in each samples_<step>.png
    eval_samples: int = 1000  # samples drawn by evaluate for FD / IS-like (images) or MMD (2D, at most half the test set)
    eval_batch: int = 500  # examples per batch in evaluate and sampling

PRESETS = {
    "fashion-mnist": dict(channels=32, ch_mult="1,2,2", res_blocks=1, attn_res="7", dropout=0.0, lr=5e-4, batch_size=64, steps=2500,
                          warmup=200, ema=0.999, N=100, log_every=100, ckpt_every=500, eval_n=1000, lik_n=100, eval_samples=250,
                          eval_batch=250, rtol=1e-4, atol=1e-4),
    "toy": dict(hidden=256, layers=3, lr=1e-3, batch_size=512, steps=20000, warmup=0, ema=0.999, sigma_max=10.0, log_every=1000,
                ckpt_every=5000, eval_samples=5000, eval_batch=5000, grid=20000),
    "cifar10": dict(channels=128, ch_mult="1,2,2,2", res_blocks=4, attn_res="16", dropout=0.1, lr=2e-4, batch_size=128,
                    steps=1_300_000, reduce_mean=True, hflip=True, log_every=1000, ckpt_every=10000, eval_every=100_000,
                    eval_n=10000, eval_samples=10000, eval_batch=1000),
}  # cifar10: DDPM++ cont. (VP; `--sde subvp`: DDPM++ cont. sub-VP), Euler-Maruyama N 1000, no corrector
VE = {"cifar10": dict(ema=0.999, reduce_mean=False, centered=False, predictor="reverse", corrector="langevin"),
      "fashion-mnist": dict(centered=False, predictor="reverse", corrector="langevin", sigma_max=28.0),  # 28 = sqrt(784)
      "toy": dict(predictor="reverse")}  # NCSN++ cont.; 2D: no corrector (snr 0.16 blurred 8gaussians: MMD^2 0.039 vs 0.00016)
PRESETS_VE = {k: {**v, **VE[k]} for k, v in PRESETS.items()}

def ints(s):
    return [int(v) for v in s.split(",") if v.strip()]

def resolve(cfg, kind=None):
    for flag, v, lo in (("--N", cfg.N, 1), ("--M", cfg.M, 0), ("--channels", cfg.channels, 4), ("--res-blocks", cfg.res_blocks, 1),
                        ("--hidden", cfg.hidden, 1), ("--layers", cfg.layers, 1), ("--grid", cfg.grid, 1), ("--lik-n", cfg.lik_n, 0),
                        ("--eval-samples", cfg.eval_samples, 0), ("--eval-batch", cfg.eval_batch, 1), ("--warmup", cfg.warmup, 0),
                        ("--interpolate", cfg.interpolate, 0)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    try:
        nets = len(ints(cfg.ch_mult)) > 0 and min(ints(cfg.ch_mult)) > 0 and all(r > 0 for r in ints(cfg.attn_res))
    except ValueError:
        nets = False
    for ok, msg in (
            (nets, f"--ch-mult {cfg.ch_mult!r} / --attn-res {cfg.attn_res!r}: accepted comma-separated positive integers"),
            (cfg.sigma_max > cfg.sigma_min > 0 and cfg.beta_max > cfg.beta_min > 0, "--sigma-max / --sigma-min / --beta-max / --beta-min: "
             "accepted sigma_max > sigma_min > 0, beta_max > beta_min > 0"),
            (all(0 <= e < 1 for e in (cfg.t_eps, cfg.sample_eps, cfg.lik_eps)) and min(cfg.rtol, cfg.atol, cfg.snr) > 0,
             "--t-eps / --sample-eps / --lik-eps: accepted 0 <= eps < 1; --rtol, --atol, --snr: accepted > 0"),
            (cfg.sde == "ve" or cfg.t_eps > 0 and cfg.lik_eps > 0, "--t-eps 0 / --lik-eps 0 with VP or sub-VP: std(0) = 0 makes the score "
             "infinite; accepted eps > 0"),
            (cfg.predictor != "none" or cfg.corrector != "none", "--predictor none --corrector none samples nothing; accepted: a "
             "predictor, a corrector, or both"),
            (0 <= cfg.ema < 1 and cfg.grad_clip >= 0 and 0 <= cfg.dropout < 1, f"--ema {cfg.ema} / --grad-clip {cfg.grad_clip} / "
             f"--dropout {cfg.dropout}: accepted 0 <= ema < 1, clip >= 0, 0 <= dropout < 1"),
            (kind in (None, "image", "toy"), f"sde.py models images and 2D data; --dataset {cfg.dataset} holds {kind} data"),
            (not cfg.interpolate or cfg.sample and kind != "toy", "--interpolate works with --sample N on image data (it encodes test images)"),
            (kind != "image" or cfg.trace != "exact", "--trace exact takes one backward pass per dimension per function evaluation: "
             "use it on 2D data (images: hutchinson)")):
        if not ok:
            common.fail(msg)
    return cfg

def sample_eps(cfg):  # official: 1e-3 for VP / sub-VP, 1e-5 for VE
    return cfg.sample_eps or (1e-5 if cfg.sde == "ve" else 1e-3)


# ----------------------------------------------------------------------------- the SDEs
class SDE:
    """dx = f(x, t) dt + g(t) dw for t in [0, 1], its Gaussian kernel p_0t = N(m(t) x(0), std(t)^2 I), its prior at t = 1.
    t: a float or a tensor; m, std in float64 (std from expm1, never 1 - m^2 at run time), cast where they are used."""
    def __init__(self, kind, beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0):
        self.kind, self.b0, self.b1, self.smin, self.smax = kind, beta_min, beta_max, sigma_min, sigma_max
    def _t(self, t):
        return torch.as_tensor(t, dtype=torch.float64)
    def beta(self, t):  # VP: beta(t) = beta_min + t (beta_max - beta_min)
        return self.b0 + self._t(t) * (self.b1 - self.b0)
    def log_m(self, t):  # VP, sub-VP: log m(t) = -1/2 int_0^t beta(s) ds = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2
        return -0.25 * self._t(t) ** 2 * (self.b1 - self.b0) - 0.5 * self._t(t) * self.b0
    def sigma(self, t):  # VE: sigma(t) = sigma_min (sigma_max / sigma_min)^t
        return self.smin * (self.smax / self.smin) ** self._t(t)
    def f(self, x, t):  # the drift
        return torch.zeros_like(x) if self.kind == "ve" else -0.5 * bcast(self.beta(t), x) * x
    def g(self, t):  # the diffusion coefficient (float64)
        if self.kind == "ve":  # sqrt(d sigma^2 / dt)
            return self.sigma(t) * math.sqrt(2 * math.log(self.smax / self.smin))
        if self.kind == "vp":
            return self.beta(t).sqrt()
        return (self.beta(t) * -torch.expm1(4 * self.log_m(t))).sqrt()  # sub-VP: beta(t) (1 - exp(-2 int_0^t beta))
    def m(self, t):  # the kernel's mean coefficient
        return torch.ones_like(self._t(t)) if self.kind == "ve" else self.log_m(t).exp()
    def std(self, t):  # the kernel's standard deviation (VP: sqrt(1 - m^2), sub-VP: 1 - m^2, from expm1)
        v = -torch.expm1(2 * self.log_m(t))
        return self.sigma(t) if self.kind == "ve" else v.sqrt() if self.kind == "vp" else v
    def marginal(self, x0, t):  # p_0t(x(t) | x(0)) = N(m x(0), std^2 I): (mean, std broadcast to x0)
        return bcast(self.m(t), x0) * x0, bcast(self.std(t), x0)
    def prior_std(self):  # p_1 = N(0, prior_std^2 I): sigma_max for VE, 1 for VP / sub-VP (m(1) ~ 0.007 for beta 0.1 .. 20)
        return self.smax if self.kind == "ve" else 1.0
    def prior_logp(self, z):  # log N(z; 0, prior_std^2 I), summed per example, float64
        s, z = self.prior_std(), z.double().flatten(1)
        return -0.5 * z.pow(2).sum(1) / s ** 2 - z.shape[1] * (math.log(s) + 0.5 * math.log(2 * math.pi))
    def discrete(self, ts):
        """The forward chain's step on the grid ts (t_0 < ... < t_N, float64): (f_i, G_i) with x_i = (1 + f_i) x_{i-1} + G_i z.
        VE (NCSN): f_i = 0, G_i^2 = sigma_i^2 - sigma_{i-1}^2; VP (DDPM): 1 + f_i = sqrt(1 - beta_i), G_i^2 = beta_i with
        beta_i = 1 - m(t_i)^2 / m(t_{i-1})^2; sub-VP: Euler-Maruyama, f_i = -beta(t_i) dt / 2, G_i = g(t_i) sqrt(dt). Index i = 1..N."""
        ts = self._t(ts)
        if self.kind == "ve":
            s2 = self.sigma(ts) ** 2
            return torch.zeros_like(ts[1:]), (s2[1:] - s2[:-1]).sqrt()
        if self.kind == "vp":
            beta = -torch.expm1(2 * (self.log_m(ts[1:]) - self.log_m(ts[:-1])))
            return (1 - beta).sqrt() - 1, beta.sqrt()
        dt = ts[1:] - ts[:-1]
        return -0.5 * self.beta(ts[1:]) * dt, self.g(ts[1:]) * dt.sqrt()

def bcast(v, like):  # a float64 scalar or (B,) tensor -> like's dtype and device, shaped to broadcast over like
    v = torch.as_tensor(v).to(like.device, like.dtype)
    return v.view(-1, *[1] * (like.dim() - 1)) if v.dim() else v

def make_sde(cfg):
    return SDE(cfg.sde, cfg.beta_min, cfg.beta_max, cfg.sigma_min, cfg.sigma_max)


# ----------------------------------------------------------------------------- networks
def init_(layer, zero=False):  # score_sde's default_init: Xavier uniform (fan_avg), or ~0 (init_scale 0), bias 0
    (nn.init.zeros_ if zero else nn.init.xavier_uniform_)(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

def conv(c_in, c_out, k=3, zero=False):
    return init_(nn.Conv2d(c_in, c_out, k, padding=k // 2), zero)

def gn(c):  # score_sde's GroupNorm: min(c / 4, 32) groups
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)

def positional(t, dim):  # DDPM's sinusoidal embedding of the label t (B,) -> (B, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)

class Embedding(nn.Module):
    """The noise label -> (B, out): VP / sub-VP positional(999 t); VE Gaussian Fourier features [sin, cos](2 pi W log sigma(t)),
    W ~ N(0, 16^2) fixed; then Dense, SiLU, Dense."""
    def __init__(self, sde, nf, out):
        super().__init__()
        self.kind, self.sde, self.nf = sde.kind, sde, nf
        if self.kind == "ve":  # nf fixed frequencies, 2 nf features (score_sde's)
            self.register_buffer("W", torch.randn(nf) * 16.0)
        self.mlp = nn.Sequential(init_(nn.Linear(nf * (2 if self.kind == "ve" else 1), out)), nn.SiLU(), init_(nn.Linear(out, out)))
    def forward(self, t):  # t (B,) float
        if self.kind != "ve":
            return self.mlp(positional(999 * t, self.nf))
        proj = 2 * math.pi * self.sde.sigma(t).log().float()[:, None] * self.W[None]  # (B, nf)
        return self.mlp(torch.cat([proj.sin(), proj.cos()], 1))

class ResBlock(nn.Module):
    """DDPM++'s BigGAN-type block (score_sde ResnetBlockBigGANpp, no FIR): GN, SiLU, [resample], conv, + Dense(SiLU(temb)),
    GN, SiLU, dropout, conv (zero init); the skip [resampled] and 1x1-convolved when the shape changes; (skip + h) / sqrt 2."""
    def __init__(self, c_in, c_out, t_dim, dropout, resample=None):
        super().__init__()
        self.resample = resample  # None | "up" (nearest x2) | "down" (2 x 2 mean)
        self.norm1, self.conv1, self.temb = gn(c_in), conv(c_in, c_out), init_(nn.Linear(t_dim, c_out))
        self.norm2, self.drop, self.conv2 = gn(c_out), nn.Dropout(dropout), conv(c_out, c_out, zero=True)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out or resample else None
    def _resample(self, h):
        return h if not self.resample else F.interpolate(h, scale_factor=2.0, mode="nearest") if self.resample == "up" else F.avg_pool2d(h, 2)
    def forward(self, x, emb):
        h = self.conv1(self._resample(F.silu(self.norm1(x)))) + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        x = self._resample(x)
        return ((x if self.skip is None else self.skip(x)) + h) / math.sqrt(2)

class Attention(nn.Module):  # single-head self-attention over H W positions, (x + h) / sqrt 2 (AttnBlockpp)
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = gn(c), conv(c, 3 * c, 1), conv(c, c, 1, zero=True)
    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, -1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return (x + self.proj(h)) / math.sqrt(2)

class UNet(nn.Module):
    """DDPM++ / NCSN++ without FIR and progressive paths: x (B, C, H, W), t (B,) -> the network output (B, C, H, W)."""
    def __init__(self, cfg, shape):
        super().__init__()
        C, H, _ = shape
        nf, mult, attn, nb = cfg.channels, ints(cfg.ch_mult), set(ints(cfg.attn_res)), cfg.res_blocks
        self.centered = cfg.centered
        self.embed = Embedding(make_sde(cfg), nf, 4 * nf)
        self.conv_in, self.down, skips, c, res = conv(C, nf), nn.ModuleList(), [nf], nf, H
        for i, m in enumerate(mult):
            for _ in range(nb):
                self.down.append(nn.ModuleList([ResBlock(c, nf * m, 4 * nf, cfg.dropout)] + ([Attention(nf * m)] if res in attn else [])))
                c = nf * m
                skips.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.ModuleList([ResBlock(c, c, 4 * nf, cfg.dropout, "down")]))
                res //= 2
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, 4 * nf, cfg.dropout), Attention(c), ResBlock(c, c, 4 * nf, cfg.dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(nb + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), nf * m, 4 * nf, cfg.dropout)]))
                c = nf * m
            if res in attn:
                self.up[-1].append(Attention(c))
            if i > 0:
                self.up.append(nn.ModuleList([ResBlock(c, c, 4 * nf, cfg.dropout, "up")]))
                res *= 2
        self.out = nn.Sequential(gn(c), nn.SiLU(), conv(c, C, zero=True))

    def forward(self, x, t):
        emb = self.embed(t)
        hs = [self.conv_in(x if self.centered else 2 * x - 1)]  # the network sees [-1, 1]
        for layers in self.down:
            hs.append(apply(layers, hs[-1], emb))
        h = apply(self.mid, hs[-1], emb)
        for layers in self.up:
            h = apply(layers, h if layers[0].resample else torch.cat([h, hs.pop()], 1), emb)  # (B, c + c_skip, H, W)
        return self.out(h)

def apply(layers, h, emb):
    for layer in layers:
        h = layer(h, emb)
    return h

class MLP(nn.Module):
    """2D data: h_k = SiLU(W_k h_{k-1} + E_k emb(t)), output W h_n (zero init), emb as the U-Net's."""
    def __init__(self, cfg, d=2):
        super().__init__()
        self.embed = Embedding(make_sde(cfg), 128, cfg.hidden)
        dims = [d] + [cfg.hidden] * cfg.layers
        self.lin = nn.ModuleList(init_(nn.Linear(a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.temb = nn.ModuleList(init_(nn.Linear(cfg.hidden, cfg.hidden)) for _ in range(cfg.layers))
        self.out = init_(nn.Linear(cfg.hidden, d), zero=True)
    def forward(self, x, t):
        emb, h = F.silu(self.embed(t)), x
        for lin, temb in zip(self.lin, self.temb):
            h = F.silu(lin(h) + temb(emb))
        return self.out(h)

def make_model(cfg, shape):
    return MLP(cfg, shape[0]) if len(shape) == 1 else UNet(cfg, shape)

def score_fn(model, sde, run=None):
    """s_theta(x, t) in float32 from the network output: -out / std(t) (VP, sub-VP: the network predicts the noise z),
    out / sigma(t) (VE: scale_by_sigma). t: a float or (B,); run: its autocast (None: fp32)."""
    sign = 1.0 if sde.kind == "ve" else -1.0
    def score(x, t):
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(len(x))
        with run.autocast() if run else nullcontext():
            out = model(x, t.float()).float()
        return sign * out / bcast(sde.std(t), out)
    return score


# ----------------------------------------------------------------------------- objective
# slide "Score matching through SDE": E_t lambda(t) E_x(0) E_x(t)|x(0) ||s_theta(x(t), t) - grad log p_0t(x(t) | x(0))||^2 (x 1/2),
# grad log p_0t = -(x(t) - m x(0)) / std^2 = -z / std; lambda = std^2: 1/2 ||std s + z||^2; lambda = g^2: 1/2 g^2 ||s + z / std||^2
def dsm_loss(score, sde, x0, t, z, weighting="sigma2", reduce_mean=False):
    mean, std = sde.marginal(x0, t)
    s = score(mean + std * z, t)  # x(t) = m x(0) + std z
    sq = (std * s + z) ** 2 if weighting == "sigma2" else bcast(sde.g(t) ** 2, x0) * (s + z / std) ** 2
    return sq.flatten(1).mean(1) if reduce_mean else 0.5 * sq.flatten(1).sum(1)  # (B,), as score_sde's reduce_op

def by_quartile(v, t, name):  # the mean of v (B,) over the examples with t in each quarter of [0, 1] (NaN where none)
    q = (t * 4).long().clamp(0, 3)
    sums, counts = (torch.zeros(4, device=v.device).scatter_add(0, q, w) for w in (v.float(), torch.ones_like(v, dtype=torch.float)))
    return {f"{name}_q{k}": torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)[k] for k in range(4)}

def loss_fn(net, sde, x0, cfg, run=None):
    """Continuous DSM at t ~ U(t_eps, 1) per example: (loss, terms), terms also by t quartile (q0: t < 1/4, the least noise)."""
    t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(len(x0), device=x0.device, dtype=torch.float64)
    per = dsm_loss(score_fn(net, sde, run), sde, x0, t, torch.randn_like(x0), cfg.weighting, cfg.reduce_mean)
    return per.mean(), {"loss": per.mean(), **by_quartile(per.detach(), t, "loss")}


# ----------------------------------------------------------------------------- the ODE solver
# Dormand & Prince (1980), RK5(4)7FM: nodes C, stages A (the last row = the 5th-order weights, so the 7th stage is f at the new
# point and starts the next step: "first same as last"), E = 5th- minus 4th-order weights, the local error estimate.
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9), (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

def rms_ratio(vs, scales):  # max over the state's tensors of RMS(v / scale): each tensor's error counts on its own (torchdiffeq)
    return max((v / s).pow(2).mean().sqrt().item() for v, s in zip(vs, scales) if v.numel())

def dopri5(f, y, t0, t1, rtol, atol, max_steps=10000):
    """y(t1) of dy/dt = f(t, y) from y(t0) = y (a list of tensors), adaptive Dormand-Prince 5(4): a step is accepted when every
    tensor's RMS error / (atol + rtol max(|y|, |y_new|)) <= 1, the next h = h clamp(0.9 ratio^(-1/5), 0.2, 10). Returns
    (y(t1), the number of f evaluations); fails with one line if the steps run out or the error turns non-finite."""
    t, d, nfe = float(t0), 1.0 if t1 > t0 else -1.0, 1
    k1 = f(t, y)
    scale = [atol + rtol * v.abs() for v in y]  # first step: Hairer, Norsett & Wanner II.4, simplified
    d0, d1 = rms_ratio(y, scale), rms_ratio(k1, scale)
    h = min(abs(t1 - t0), 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6)
    for _ in range(max_steps):
        last = abs(t1 - t) <= h * (1 + 1e-9)
        hs = (t1 - t) if last else d * h
        ks = [k1]
        for i in range(1, 7):
            y_i = [v + hs * sum(a * k[j] for a, k in zip(A[i], ks) if a) for j, v in enumerate(y)]
            ks.append(f(t + C[i] * hs, y_i))
        nfe += 6
        err = [hs * sum(e * k[j] for e, k in zip(E, ks) if e) for j in range(len(y))]
        ratio = rms_ratio(err, [atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y_i)])
        if not math.isfinite(ratio):
            break
        if ratio <= 1:
            y, k1, t = y_i, ks[6], t + hs
            if last:
                return y, nfe
        h = abs(hs) * min(10.0, max(0.2, 0.9 * ratio ** -0.2 if ratio > 0 else 10.0))
    common.fail(f"the ODE solver failed between t = {t0:g} and {t1:g} (stopped at t = {t:.4g}, {nfe} evaluations): a non-finite "
                "score or too stiff at this tolerance; try larger --rtol / --atol")


# ----------------------------------------------------------------------------- sampling
def langevin_corrector(score, x, t, alpha, snr, M):
    """M steps x <- x + e s + sqrt(2 e) z at time t, e = 2 alpha (r ||z|| / ||s||)^2, norms averaged over the batch (the paper's
    Algorithms 4 / 5: the step size that gives the signal-to-noise ratio r); alpha = 1 (VE) or 1 - beta_i (VP, sub-VP)."""
    for _ in range(M):
        s, z = score(x, t), torch.randn_like(x)
        e = 2 * alpha * (snr * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2  # a tensor: no host sync
        x = x + e * s + (2 * e).sqrt() * z
    return x

@torch.no_grad()
def pc_sample(score, sde, x, eps, N, predictor="reverse", corrector="langevin", snr=0.16, M=1, denoise=True):
    """PC sampling (slides, Algorithm 2 for VE and 3 for VP) on t_N = 1 > ... > t_0 = eps from x = x_N ~ p_1. For i = N-1..0:
    the predictor from t_{i+1} to t_i, then M corrector steps at t_i; denoise: the last predictor step without noise, no corrector
    after it. Returns x_0 and the network evaluations per sample."""
    ts = torch.linspace(eps, 1.0, N + 1, dtype=torch.float64)  # t_0 = eps < t_1 < ... < t_N = 1
    f_i, G_i = sde.discrete(ts)  # the forward chain x_{i+1} = (1 + f) x_i + G z, index i = 0..N-1 here
    vp = sde if sde.kind == "vp" else SDE("vp", sde.b0, sde.b1)
    alpha = torch.ones_like(f_i) if sde.kind == "ve" else (1 + vp.discrete(ts)[0]) ** 2  # Langevin: 1 - beta_i (sub-VP: VP's)
    nfe = 0
    for i in range(N - 1, -1, -1):
        t, last = float(ts[i + 1]), denoise and i == 0
        if predictor == "reverse":  # x_i = x_{i+1} - f_{i+1} x_{i+1} + G^2 s(x_{i+1}, t_{i+1}) + G z: lines 3-5 of Algorithms 2 / 3
            x = x - float(f_i[i]) * x + float(G_i[i]) ** 2 * score(x, t) + (0 if last else float(G_i[i]) * torch.randn_like(x))
        elif predictor == "euler":  # reverse SDE dx = [f - g^2 s] dt + g dw_bar, by Euler-Maruyama with dt = t_i - t_{i+1} < 0
            dt, g = float(ts[i] - ts[i + 1]), float(sde.g(t))
            x = x + (sde.f(x, t) - g ** 2 * score(x, t)) * dt + (0 if last else g * math.sqrt(-dt) * torch.randn_like(x))
        nfe += predictor != "none"
        if corrector == "langevin" and not last:  # lines 6-8
            x = langevin_corrector(score, x, float(ts[i]), float(alpha[i - 1]) if i > 0 else 1.0, snr, M)
            nfe += M
    return x, nfe

def ode_drift(score, sde, x, t):  # the probability-flow ODE: dx/dt = f(x, t) - g(t)^2 s_theta(x, t) / 2
    return sde.f(x, t) - 0.5 * float(sde.g(t)) ** 2 * score(x, t)

@torch.no_grad()
def ode_solve(score, sde, x, t0, t1, rtol, atol):
    """x(t1) from x(t0) along the probability-flow ODE (t0 = 1 > t1: sampling / decoding; t0 < t1 = 1: encoding); and the NFE."""
    f = lambda t, y: [ode_drift(score, sde, y[0].float(), t).double()]
    y, nfe = dopri5(f, [x.double()], t0, t1, rtol, atol)
    return y[0].float(), nfe

def divergence(drift, x, probe):  # div_x drift: exact (probe None, one backward pass per dimension) or Hutchinson's probe^T J probe
    if probe is None:
        flat = drift.flatten(1)
        return sum(torch.autograd.grad(flat[:, d].sum(), x, retain_graph=True)[0].flatten(1)[:, d] for d in range(flat.shape[1]))
    return (torch.autograd.grad(drift, x, probe)[0] * probe).flatten(1).sum(1)

def log_likelihood(score, sde, x, eps, rtol, atol, trace="hutchinson", generator=None):
    """log p_eps(x) (B,) in nats, the model's density at t = eps: [x, delta] from t = eps to 1, dx/dt = the ODE drift, d delta/dt =
    div drift; log p_eps(x) = log p_1(x(1)) + delta(1); one Rademacher probe per solve (hutchinson). Returns (log p, x(1), NFE)."""
    probe = None if trace == "exact" else (torch.randint(0, 2, x.shape, generator=generator).to(x.device, torch.float32) * 2 - 1)

    def f(t, y):
        with torch.enable_grad():
            xt = y[0].float().requires_grad_(True)
            drift = ode_drift(score, sde, xt, t)
            div = divergence(drift, xt, probe)
        return [drift.detach().double(), div.detach().double()]
    (z, delta), nfe = dopri5(f, [x.double(), torch.zeros(len(x), dtype=torch.float64, device=x.device)], eps, 1.0, rtol, atol)
    return sde.prior_logp(z) + delta, z.float(), nfe

def to_bpd(log_p, shape, centered):
    """Bits/dim of 8-bit data from log p of y_sde = 2y - 1 (centered) or y, y = (k + u) / 256: log p(y) = log p(y_sde) + D log 2
    (centered: the Jacobian of y -> 2y - 1), then -log p(y) / (D log 2) + 8 (common.dequantized_bpd)."""
    D = math.prod(shape)
    return common.dequantized_bpd(log_p + (D * math.log(2) if centered else 0.0), D)

def to_sde_space(x, cfg, kind):  # images in [0, 1] -> the SDE's space ([-1, 1] if centered); 2D data as they are
    return 2 * x - 1 if kind == "image" and cfg.centered else x

def to_images(x, cfg):  # the SDE's space -> [0, 1] (not clamped)
    return (x + 1) / 2 if cfg.centered else x

def draw(model, sde, n, shape, cfg, run):
    """n samples (the SDE's space) in batches of cfg.eval_batch by cfg.sampler, and the cost: NFE per sample, images/s."""
    score, xs, nfes, t0 = score_fn(model.eval(), sde, run), [], [], time.time()
    for start in range(0, n, cfg.eval_batch):
        x = torch.randn(min(cfg.eval_batch, n - start), *shape, device=run.device) * sde.prior_std()  # x_N ~ p_1
        if cfg.sampler == "ode":
            x, nfe = ode_solve(score, sde, x, 1.0, sample_eps(cfg), cfg.rtol, cfg.atol)
        else:
            x, nfe = pc_sample(score, sde, x, sample_eps(cfg), cfg.N, cfg.predictor, cfg.corrector, cfg.snr, cfg.M, cfg.denoise)
        xs.append(x.cpu())
        nfes.append(nfe)
    dt = time.time() - t0
    return torch.cat(xs), {"nfe": sum(nfes) / len(nfes), "images_per_s": n / dt, "s_per_image": dt / n}

def sampler_name(cfg):
    return (f"probability-flow ODE (dopri5, rtol {cfg.rtol:g}, atol {cfg.atol:g})" if cfg.sampler == "ode" else f"PC {cfg.predictor} + "
            f"{cfg.corrector}" + (f" (snr {cfg.snr:g}, M {cfg.M})" if cfg.corrector != "none" else "") + f", N {cfg.N}" + (", denoised" if cfg.denoise else ""))

def histogram_image(x, bins=200, lim=LIM):  # 2D points -> (1, bins, bins) image of their density, the darkest where most fall
    k = ((x + lim) / (2 * lim) * bins).floor().long()
    k = k[((k >= 0) & (k < bins)).all(1)]
    h = torch.bincount(k[:, 0] * bins + k[:, 1], minlength=bins * bins).view(bins, bins).float().T.flip(0)
    return 1 - (h / h.max().clamp_min(1)).sqrt()[None]

def save_samples(model, sde, shape, cfg, run, name, n):
    x, cost = draw(model, sde, n, shape, cfg, run)
    common.save_grid(to_images(x, cfg) if len(shape) > 1 else histogram_image(x)[None], run.out / f"{name}.png")
    return x, cost

def slerp(z0, z1, w):  # spherical interpolation between latents (B, ...) at weight w
    a, b = z0.flatten(1), z1.flatten(1)
    omega = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp_min(1e-6)[:, None]
    return ((torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)).view_as(z0)

def interpolate(model, sde, data, cfg, run, pairs):
    """Encode 2 pairs of test images to x(1) by the ODE, decode 8 slerp points between each pair's latents -> interpolate.png
    (a row per pair; the ends are the decoded latents of the two images); returns the mean and max |decode(encode(x)) - x|."""
    score = score_fn(model.eval(), sde, run)
    x = to_sde_space(data.test[:2 * pairs].float().div(255).to(run.device), cfg, "image")
    z, _ = ode_solve(score, sde, x, cfg.lik_eps, 1.0, cfg.rtol, cfg.atol)
    w = torch.linspace(0, 1, 8)
    zs = torch.stack([slerp(z[:pairs], z[pairs:], float(v)) for v in w], 1).flatten(0, 1)  # (pairs * 8, C, H, W)
    out, _ = ode_solve(score, sde, zs, 1.0, cfg.lik_eps, cfg.rtol, cfg.atol)
    common.save_grid(to_images(out, cfg), run.out / "interpolate.png", nrow=8)
    ends = out.view(pairs, 8, *x.shape[1:])[:, [0, -1]].transpose(0, 1).flatten(0, 1)
    err = (ends - x).abs()
    return err.mean().item(), err.max().item()


# ----------------------------------------------------------------------------- evaluate
def mmd2(a, b, bandwidths=(0.05, 0.2, 0.5, 1.0)):
    """Unbiased MMD^2 between point sets a (N, D), b (M, D) in float64, kernel k = sum_h exp(-||a - b||^2 / (2 h^2))."""
    k = lambda u, v: sum(torch.exp(-torch.cdist(u.double(), v.double()) ** 2 / (2 * h * h)) for h in bandwidths)
    within = lambda u: (k(u, u).sum() - len(bandwidths) * len(u)) / (len(u) * (len(u) - 1))  # without the diagonal k(x, x) = 4
    return (within(a) + within(b) - 2 * k(a, b).mean()).item()

def inception_like_score(logits):  # exp(E_x KL(p(y|x) || p(y))) in common.classify's classes: 1 <= score <= the number of classes
    log_p = logits.double().log_softmax(1)
    return math.exp((log_p.exp() * (log_p - log_p.exp().mean(0).log())).sum(1).mean().item())

def prepare(x, cfg, data, generator=None, dequantize=None):  # images k/255 -> [(k + u) / 256 if dequantized] -> the SDE's space
    if data.kind == "image" and (cfg.dequantize if dequantize is None else dequantize):
        u = torch.rand(x.shape, generator=generator).to(x.device) if generator is not None else torch.rand_like(x)
        x = (x * 255 + u) / 256
    return to_sde_space(x, cfg, data.kind)

@torch.no_grad()
def evaluate(model, sde, data, cfg, run, step):
    """Test NLL by the probability-flow ODE (images: bpd of the dequantized 8-bit data, 2D: nats), the held-out DSM loss
    (seeded t, z), and sample quality (images: FD, IS-like; 2D: MMD^2 next to the test-vs-test floor) with the sampling cost."""
    model.eval()
    score, gen = score_fn(model, sde), torch.Generator().manual_seed(0)  # fp32: likelihood arithmetic stays out of autocast
    trace = cfg.trace if cfg.trace != "auto" else "exact" if data.kind == "toy" else "hutchinson"
    nll, dsm, n, nfes = [], [], 0, []
    lik = replace(cfg, eval_n=min(cfg.lik_n, cfg.eval_n or cfg.lik_n) or cfg.eval_n)  # the first lik_n of the eval_n test examples
    for x in common.test_batches(data, lik, run.device, cfg.eval_batch, f"test NLL by the ODE ({trace} trace)"):
        y = prepare(x, cfg, data, gen, dequantize=True)  # always dequantized: a density at the 8-bit points alone could be unbounded
        log_p, _, nfe = log_likelihood(score, sde, y, cfg.lik_eps, cfg.rtol, cfg.atol, trace, gen)
        nll.append(to_bpd(log_p, data.shape, cfg.centered) if data.kind == "image" else -log_p)
        t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(len(y), generator=gen, dtype=torch.float64)
        z = torch.randn(y.shape, generator=gen).to(run.device)
        dsm.append(dsm_loss(score, sde, y, t.to(run.device), z, cfg.weighting, cfg.reduce_mean).double().cpu())
        n, nfes = n + len(x), nfes + [nfe]
    nll = torch.cat(nll).cpu()
    extras = dict(nll_se=(nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else math.nan, nfe_likelihood=sum(nfes) / len(nfes),
                  trace=trace, lik_eps=cfg.lik_eps, dsm=torch.cat(dsm).mean().item(),
                  convention=("8-bit, uniform dequantization (k + u) / 256, includes D log 256" if data.kind == "image" else "nats per point"))
    if data.name == "8gaussians":  # the data's own NLL, for reference
        extras["nll_data"] = -gauss8_log_prob(data.test[:n].double()).mean().item()
    if cfg.eval_samples:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            if data.kind == "toy":
                m = min(cfg.eval_samples, len(data.test) // 2)
                x, cost = draw(model, sde, m, data.shape, cfg, run)
                extras.update(mmd2=mmd2(x, data.test[:m]), mmd2_floor=mmd2(data.test[m:2 * m], data.test[:m]), samples=m, **cost)
            else:
                x, cost = draw(model, sde, cfg.eval_samples, data.shape, cfg, run)
                x = to_images(x, cfg).clamp(0, 1)
                _, logits = common.classify(x, data, cfg, run)
                extras.update(fd=common.frechet_distance(x, data, cfg, run), fd_kind=common.fd_label(cfg),
                              is_like=inception_like_score(logits), samples=len(x), **cost)
        extras["sampler"] = sampler_name(cfg)
    return common.eval_record(step, nll.mean().item(), "bpd" if data.kind == "image" else "nats", "exact", n, **extras)

def gauss8_log_prob(x):  # log density of common.toy_sample's 8gaussians: equal mixture of N(c_k, (0.5 / 1.414)^2 I)
    k, s = torch.arange(8, dtype=torch.float64) * math.pi / 4, 0.5 / 1.414
    d2 = ((x[:, None] - 4 / 1.414 * torch.stack([k.cos(), k.sin()], 1)[None]) ** 2).sum(-1)  # (N, 8)
    return torch.logsumexp(-d2 / (2 * s * s), 1) - math.log(8) - math.log(2 * math.pi * s * s)


# ----------------------------------------------------------------------------- train
def load_data(cfg):
    data = common.load_data(cfg)
    resolve(cfg, data.kind)
    k = 2 ** (len(ints(cfg.ch_mult)) - 1)
    if data.kind == "image" and any(s % k for s in data.shape[1:]):
        common.fail(f"--ch-mult {cfg.ch_mult} halves the image {k.bit_length() - 1} times: sides must divide by {k}, got {data.shape[1:]}")
    return data

def train(cfg):
    data = load_data(cfg)
    run = common.setup(cfg, METHOD)
    sde, model = make_sde(cfg), make_model(cfg, data.shape).to(run.device)
    ema = common.EMA(model, cfg.ema) if cfg.ema else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run, hflip=cfg.hflip)
    parts = {"ema": ema} if ema else {}
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, **parts)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    sampler = lambda: ema.model if ema else model
    run.print(f"{type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {cfg.sde.upper()} SDE | "
              f"lambda = {'std^2' if cfg.weighting == 'sigma2' else 'g^2'} | sampler: {sampler_name(cfg)}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, **parts,
                               shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            model.train()
            for group in opt.param_groups:  # linear warm-up
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            x = prepare(next(batches), cfg, data)
            loss, terms = loss_fn(net, sde, x, cfg, run)  # (the network runs under the run's autocast inside score_fn)
            opt.zero_grad(set_to_none=True)
            update(loss)
            if ema:
                ema.update(model, step + 1)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(sampler(), sde, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_samples(sampler(), sde, data.shape, cfg, run, f"samples_{step}", cfg.grid)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        save_samples(sampler(), sde, data.shape, cfg, run, f"samples_{step}", cfg.grid)
        log.write(evaluate(sampler(), sde, data, cfg, run, step))
    return model, ema


# ----------------------------------------------------------------------------- main
def presets_for(argv):  # --sde ve on the command line: NCSN++ cont.'s presets
    kind = [a.split("=", 1)[1] if "=" in a else argv[k + 1] if k + 1 < len(argv) else "" for k, a in enumerate(argv)
            if a == "--sde" or a.startswith("--sde=")]
    return PRESETS_VE if kind and kind[-1] == "ve" else PRESETS

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(common.parse_config(Config, presets_for(argv), METHOD, argv=argv))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    shape = tuple(ckpt["shape"])
    resolve(cfg, "toy" if len(shape) == 1 else "image")
    sde, model = make_sde(cfg), make_model(cfg, shape).to(run.device).eval()
    common.load_model_state(model, ckpt.get("ema", ckpt["model"]), cfg.ckpt)  # the EMA weights if trained with EMA
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        _, cost = save_samples(model, sde, shape, cfg, run, "sample", cfg.sample)
        print(f"{cfg.sample} samples in {cfg.sample * cost['s_per_image']:.3f}s ({cost['images_per_s']:.2f} images/s, "
              f"{cost['nfe']:.0f} network evaluations each: {sampler_name(cfg)}) -> {run.out / 'sample.png'}")
        if cfg.interpolate:
            mean, top = interpolate(model, sde, load_data(cfg), cfg, run, cfg.interpolate)
            print(f"interpolation of {cfg.interpolate} pairs -> {run.out / 'interpolate.png'}; |decode(encode(x)) - x| in the SDE's space: "
                  f"mean {mean:.2e}, max {top:.2e} (solver-limited: lower --rtol / --atol)")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, sde, load_data(cfg), cfg, run, ckpt["step"]))

if __name__ == "__main__":
    main()
