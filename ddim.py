"""Denoising Diffusion Implicit Models (DDIM): fast, deterministic sampling of a DDPM-trained network.

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502 (ICLR 2021).
Slides: "Denoising Diffusion Implicit Models (DDIM)".

The DDPM objective L_simple depends only on the marginals q(x_t|x_0), so any inference process with those marginals
trains the same network eps_theta. DDIM picks a non-Markovian family q_sigma indexed by sigma_t, and a generative
process that predicts x_0 from x_t and then samples q_sigma(x_{t-1}|x_t, x_0) with that prediction. Symbols as on
the slides, where the DDIM paper's alpha_t is DDPM's alpha_bar_t (written alpha_bar below and in the code):

    q(x_t|x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    f_theta(x_t) = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)            "predicted x_0"
    x_{t-1} = sqrt(alpha_bar_{t-1}) f_theta(x_t) + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_theta(x_t, t) + sigma_t eps
    sigma_{tau_i}(eta) = eta sqrt((1 - alpha_bar_{tau_{i-1}}) / (1 - alpha_bar_{tau_i})) sqrt(1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}})
    eta = 1: DDPM (sigma_t^2 = beta_tilde_t at S = T); eta = 0: DDIM, a deterministic map x_T -> x_0.
    Accelerated: the same update on a sub-sequence tau_1 < ... < tau_S of 1..T (S steps, S network evaluations).

Details as the official code (ermongroup/ddim): tau is uniform, tau_i = (i - 1) T/S + 1, or quadratic,
tau_i = floor((i - 1)^2 0.8 T / (S - 1)^2) + 1 (duplicates removed; S = len(tau) is reported); the step after tau_1
goes to alpha_bar_0 = 1, where sigma = 0, so the last step returns f_theta(x_{tau_1}) without noise; no clipping of x_0.
Encoding (paper sec. 4.3, 5.4): eta = 0 is an Euler discretisation of an ODE, which run the other way maps x_0 to
x_T: x_{tau_i} = sqrt(alpha_bar_{tau_i}) f_theta(x_{tau_{i-1}}) + sqrt(1 - alpha_bar_{tau_i}) eps_theta(x_{tau_{i-1}});
from x_0 itself (tau_0 = 0) the network is asked at t = 1, the first time it was trained on. Reconstruction error
is reported per dimension on [0, 1] (the paper's Table 2); interpolation is a slerp between two x_T (paper sec. 5.3).

Networks and checkpoints: the U-Net, schedules and L_simple training are ddpm.py's, copied (a file imports no other
method file), with the same parameter names, so ddim.py samples from a ddpm.py checkpoint (its EMA weights; with
ddpm.py --improved only the eps half of the output is used: DDIM sets the variance by eta). DDIM with eta = 0 is an
implicit model: no likelihood, so `evaluate` reports test_nll null, the held-out L_simple, FD (classifier features)
of samples, the sampler's cost and the reconstruction error; the bound of the same weights is `ddpm.py --eval`'s.
`--table` reproduces the slide's Table 1 grid (S x eta) at `--sample N` samples per cell, same x_T in every cell.

Run:
    python ddim.py --ckpt runs/ddpm/fashion-mnist/ckpt.pt --steps-sample 50 --eta 0     # 64 samples, 50 steps
    python ddim.py --ckpt runs/ddpm/fashion-mnist/ckpt.pt --sample 200 --table          # the S x eta FD table
    python ddim.py --ckpt runs/ddpm/fashion-mnist/ckpt.pt --sample 64 --interpolate 8    # + slerp interpolations
    python ddim.py --eval --ckpt runs/ddpm/fashion-mnist/ckpt.pt --eval-n 100           # FD, reconstruction error
    python ddim.py                                                # train with L_simple (ddpm.py's fashion preset)

Results (2 CPU cores, OMP_NUM_THREADS=1, the other core busy; no GPU run yet), all on ddpm.py's fashion-mnist
preset checkpoint (3000 steps, EMA with the decay warm-up; its bound 3.640 bpd and 1000-step FD 259.3 are in ddpm.py):
    FD (classifier features) of 64 samples vs 64 test images, the same x_T in every cell, tau uniform:
      `python ddim.py --ckpt runs/ddpm/fashion-mnist/ckpt.pt --sample 64 --table --table-steps 10,20,50,100` (EMA
      weights, the default; S = 1000: `--table-steps 1000 --table-etas 0,1`), and the same with `--no-use-ema`:
        eta, S:   10      20      50      100     1000          raw:  10      20      50      100
        0         235.1   195.2   193.7   195.7   196.5               443.5   414.6   400.2   398.3
        0.2       230.0   215.2   196.8   185.4                       446.1   400.5   374.3   375.3
        0.5       222.2   192.7   182.4   137.1                       449.0   390.8   385.5   379.8
        1         151.2   138.2   118.0    98.7   106.6               427.1   388.5   373.0   308.7
    Before the EMA decay warm-up the EMA weights were the worse ones (eta = 0: 650-747; eta = 1: 206-226): an EMA
    of decay 0.999 still held ~5% of the initial weights after 3000 steps. The slide's claim (eta = 0 at 10-50
    steps far better than eta = 1) is still NOT reproduced by this under-trained network: eta = 1 is best at every
    S. The deterministic path integrates eps_theta over sqrt((1 - alpha_bar_t) / alpha_bar_t), from 157 (t = T) to
    0, so eps errors at large t are multiplied by up to 157; the test MSE of eps_theta at t = 901, 911, ..., 991 is
    0.00070 (EMA) / 0.00138 (raw) on 20 test images (before the warm-up 0.0031 / 0.0013), while the exact E[eps|x_t]
    has MSE <= alpha_bar_t Var(x_0) <= 1.4e-4 there; fresh noise (eta > 0) forgets those errors. With the exact eps
    of Gaussian data (tests) eta = 0 is the most accurate at few steps.
    `python ddim.py --eval --ckpt runs/ddpm/fashion-mnist/ckpt.pt` (S = 50, eta = 0, 20 test images, 16 samples):
      test L_simple 0.0466; reconstruction MSE per dimension 0.00124 (the paper, CIFAR-10, S = 50: 0.0023); FD
      261.8; 3.4 images/s at 50 network evaluations (`--no-use-ema`: 0.0476, 0.00131, 631.1).
    Sampling speed (the table runs, batch 64): 15.7-19.2 images/s at S = 10, 3.3-3.7 at S = 50, 1.7-1.8 at
    S = 100; ddpm.py's ancestral sampler: 0.17 images/s at 1000 steps (batch 16).
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "ddim"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    steps_sample: int = 50  # S: sampling steps on the sub-sequence tau (S <= T)
    eta: float = 0.0  # stochasticity: 0 = DDIM (deterministic), 1 = DDPM
    tau: str = common.choice("uniform", "quadratic")  # how the S steps are spread over 1..T
    table: bool = False  # with --sample N: FD of N samples for every S in --table-steps and eta in --table-etas
    table_steps: str = "10,20,50,100,1000"  # S values of the table (the slide's Table 1)
    table_etas: str = "0,0.2,0.5,1"  # eta values of the table
    interpolate: int = 0  # with --sample: rows of slerp interpolations between two x_T, decoded with eta = 0
    T: int = 1000  # diffusion steps the network was trained with
    schedule: str = common.choice("linear", "cosine")  # beta schedule (ddpm.py --improved checkpoints: cosine)
    beta_1: float = 1e-4  # linear schedule: first beta
    beta_T: float = 0.02  # linear schedule: last beta
    sigma: str = common.choice("beta", "beta_tilde", "learned")  # ddpm.py's variance; 'learned' = 2C outputs, eps used
    channels: int = 128  # U-Net base channels
    ch_mult: str = "1,2,2,2"  # channel multiplier per resolution level
    res_blocks: int = 2  # residual blocks per level
    attn_res: str = "16"  # resolutions with self-attention, comma separated ('' = none)
    dropout: float = 0.1  # dropout in the residual blocks
    warmup: int = 5000  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    ema: float = 0.9999  # EMA decay of the weights used by evaluate and sample
    ema_warmup: bool = True  # EMA decay min(ema, (1 + t) / (10 + t)) at step t (ours; Ho's and Nichol's code: ema from step 1)
    hflip: bool = True  # random horizontal flips of training images
    use_ema: bool = True  # --eval / --sample / --table with the EMA weights (--no-use-ema: the raw weights)
    grid: int = 64  # samples in each samples_<step>.png
    eval_samples: int = 64  # samples drawn by evaluate (FD, images/s)
    eval_batch: int = 500  # images per sampling batch


PRESETS = {  # the DDIM paper samples DDPM's trained networks: ddpm.py's presets
    "cifar10": dict(T=1000, beta_1=1e-4, beta_T=0.02, channels=128, ch_mult="1,2,2,2", res_blocks=2, attn_res="16",
                    dropout=0.1, lr=2e-4, batch_size=128, warmup=5000, grad_clip=1.0, ema=0.9999, steps=800_000,
                    log_every=1000, ckpt_every=10000, eval_every=100_000, eval_n=1000, eval_samples=1000,
                    tau="quadratic"),  # the paper: quadratic tau for CIFAR10, uniform (its "linear") for the others
    "fashion-mnist": dict(T=1000, channels=32, ch_mult="1,2,2", res_blocks=1, attn_res="7", dropout=0.1, lr=5e-4,
                          batch_size=64, warmup=200, ema=0.999, hflip=False, steps=3000, log_every=100,
                          ckpt_every=1000, eval_n=100, eval_samples=100, grid=16),
}


def resolve(cfg):
    if (cfg.table or cfg.interpolate) and not cfg.sample:
        common.fail("--table / --interpolate need --sample N and a --ckpt (N = samples per table cell)")
    for flag, v, lo in (("--T", cfg.T, 2), ("--steps-sample", cfg.steps_sample, 1), ("--channels", cfg.channels, 1),
                        ("--res-blocks", cfg.res_blocks, 1), ("--eval-batch", cfg.eval_batch, 1), ("--interpolate", cfg.interpolate, 0)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    if cfg.steps_sample > cfg.T:
        common.fail(f"--steps-sample {cfg.steps_sample} out of range; accepted: 1..T ({cfg.T})")
    if not 0 <= cfg.eta:
        common.fail(f"--eta {cfg.eta} out of range; accepted: >= 0 (0 = DDIM, 1 = DDPM)")
    try:
        ints(cfg.ch_mult), ints(cfg.attn_res), floats(cfg.table_etas)
        bad = [S for S in ints(cfg.table_steps) if not 1 <= S <= cfg.T]
    except ValueError:
        common.fail("--ch-mult / --attn-res / --table-steps / --table-etas: expected comma-separated numbers")
    if cfg.table and (bad or any(e < 0 for e in floats(cfg.table_etas))):
        common.fail(f"--table-steps {cfg.table_steps!r} / --table-etas {cfg.table_etas!r}: accepted S in 1..T, eta >= 0")
    return cfg


def ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def floats(s):
    return [float(v) for v in s.split(",") if v.strip()]


# ----------------------------------------------------------------------------- schedules
class Schedule(nn.Module):
    """alpha_bar_t and the constants derived from it for t = 0..T (alpha_bar_0 = 1: x_0 itself), computed in fp64,
    stored in dtype; the samplers use only these (no 1 - alpha_bar from a stored alpha_bar near 1)."""

    def __init__(self, betas, dtype=torch.float32):
        super().__init__()
        self.T = len(betas)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas.double(), 0)])
        reg = lambda name, v: self.register_buffer(name, v.to(dtype), persistent=False)
        reg("alpha_bar", alpha_bar)
        reg("log_alpha_bar", alpha_bar.log())  # log alpha_bar_t (pairs: 1 - a_t / a_s = -expm1(log a_t - log a_s))
        reg("one_minus_alpha_bar", 1 - alpha_bar)  # 1 - alpha_bar_t
        reg("sqrt_alpha_bar", alpha_bar.sqrt())  # sqrt(alpha_bar_t)
        reg("sqrt_one_minus_alpha_bar", (1 - alpha_bar).sqrt())  # sqrt(1 - alpha_bar_t)
        reg("sqrt_recip_alpha_bar", alpha_bar.rsqrt())  # 1 / sqrt(alpha_bar_t)
        reg("sqrt_recipm1_alpha_bar", ((1 - alpha_bar) / alpha_bar).sqrt())  # sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)


def make_schedule(cfg, dtype=torch.float32):
    """ddpm.py's schedules: linear (Ho et al.) or cosine (Nichol & Dhariwal eq. 17, beta_t <= 0.999)."""
    if cfg.schedule == "linear":
        return Schedule(torch.linspace(cfg.beta_1, cfg.beta_T, cfg.T, dtype=torch.float64), dtype)
    f = torch.cos((torch.arange(cfg.T + 1, dtype=torch.float64) / cfg.T + 0.008) / 1.008 * math.pi / 2) ** 2
    return Schedule((1 - f[1:] / f[:-1]).clamp(max=0.999), dtype)


# DDIM sec. 4.2 / appendix D.2: the sub-sequence tau of 1..T
def make_tau(T, S, kind):
    """(S,) increasing timesteps in 1..T: uniform (i T/S + 1) or quadratic (duplicates removed: len(tau) <= S)."""
    i = torch.arange(S)
    if kind == "uniform":
        return i * (T // S) + 1
    # tau_i = floor((i sqrt(0.8 T) / (S - 1))^2) + 1 = floor(4 T i^2 / (5 (S - 1)^2)) + 1, i = 0..S-1, in exact integers.
    # The official code (0-based t) takes int() of the float squares of np.linspace(0, sqrt(0.8 T), S): one step low at
    # exact squares (T = 1000, S = 16: 31 and 127 for 32 and 128; 95 of S = 2..1000 differ), and it keeps duplicates.
    return torch.unique(4 * T * i ** 2 // (5 * max(S - 1, 1) ** 2)) + 1


# ----------------------------------------------------------------------------- networks (ddpm.py's U-Net)
def norm(c):  # GroupNorm with 32 groups, fewer when there are few channels
    return nn.GroupNorm(math.gcd(32, c), c)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer timesteps t (B,) -> (B, dim), as the Transformer's positions."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], 1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the projected time embedding; GroupNorm, SiLU, dropout, conv; + skip."""

    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.block1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.temb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))
        self.block2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.block2[-1].weight)  # the block starts as the identity (official code: scale 1e-10)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.block1(x) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. appendix B): res blocks per level, attention at the resolutions in attn_res,
    stride-2 conv down / nearest + conv up, skip connections from every down block to the up path."""

    def __init__(self, cfg, shape):
        super().__init__()
        C, H, _ = shape
        ch, mult, attn, nb = cfg.channels, ints(cfg.ch_mult), set(ints(cfg.attn_res)), cfg.res_blocks
        self.ch, t_dim, self.out_channels = ch, 4 * ch, C * (2 if cfg.sigma == "learned" else 1)
        self.temb = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))  # the 2-layer MLP
        self.conv_in = nn.Conv2d(C, ch, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, H
        for i, m in enumerate(mult):
            for _ in range(nb):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, t_dim, cfg.dropout)] + ([Attention(ch * m)] if res in attn else [])))
                c = ch * m
                skips.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # (B, c, ceil(res/2), ...)
                res = (res + 1) // 2
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, cfg.dropout), Attention(c), ResBlock(c, c, t_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(nb + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch * m, t_dim, cfg.dropout)] + ([Attention(ch * m)] if res in attn else [])))
                c = ch * m
            if i > 0:
                self.up.append(nn.Conv2d(c, c, 3, padding=1))  # after a nearest-neighbour x2 upsampling
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    def forward(self, x, t):
        """x_t (B, C, H, W), integer t (B,) -> eps_theta (B, C, H, W) [and the variance output v, (B, C, H, W)]."""
        emb = self.temb(timestep_embedding(t, self.ch))
        hs = [self.conv_in(x)]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                hs.append(layer(hs[-1]))
            else:
                h = layer[0](hs[-1], emb)
                hs.append(layer[1](h) if len(layer) > 1 else h)
        h = self.mid[2](self.mid[1](self.mid[0](hs[-1], emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.Conv2d):
                h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # odd sides (7 -> 4 -> 8) are cropped below
            else:
                skip = hs.pop()
                h = layer[0](torch.cat([h[..., : skip.shape[-2], : skip.shape[-1]], skip], 1), emb)
                h = layer[1](h) if len(layer) > 1 else h
        return self.out(h)



# ----------------------------------------------------------------------------- objective
def at(v, t):  # a schedule vector at t (B,), shaped to broadcast over (B, C, H, W)
    return v[t][:, None, None, None]


# slide "DDIM", marginal: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
def q_sample(sched, x0, t, eps):
    return at(sched.sqrt_alpha_bar, t) * x0 + at(sched.sqrt_one_minus_alpha_bar, t) * eps


# slide "DDPM", Algorithm 1: L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2 - the objective DDIM keeps
def loss_simple(net, sched, x):
    """x in [0, 1] -> (loss, terms), the loss per timestep quartile in terms."""
    x0 = 2 * x - 1
    t = torch.randint(1, sched.T + 1, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t, eps)
    if x0.is_cuda:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    mse = (eps - net(x_t, t).float()[:, : x0.shape[1]]).pow(2).flatten(1).mean(1)  # (B,)
    q = (t - 1) * 4 // sched.T  # timestep quartile 0..3
    sums = torch.zeros(4, device=x.device).scatter_add(0, q, mse.detach())
    counts = torch.zeros(4, device=x.device).scatter_add(0, q, torch.ones_like(mse))
    by_q = torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)  # NaN: no t in that quartile (Logger skips it)
    loss = mse.mean()
    return loss, {"loss": loss, **{f"loss_q{i}": by_q[i] for i in range(4)}}


# slide "DDIM": f_theta(x_t) = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t)) / sqrt(alpha_bar_t), the predicted x_0
def predict_x0(sched, x_t, eps, t):
    return at(sched.sqrt_recip_alpha_bar, t) * x_t - at(sched.sqrt_recipm1_alpha_bar, t) * eps


# slide "DDIM": sigma_{tau_i}(eta) = eta sqrt((1 - a_{tau_{i-1}}) / (1 - a_{tau_i})) sqrt(1 - a_{tau_i} / a_{tau_{i-1}}),
# where the slide's (and the DDIM paper's) a_t is DDPM's alpha_bar_t, not DDPM's alpha_t
def ddim_sigma(sched, t, s, eta):
    if eta == 0:  # DDIM (also keeps encode's first step, from alpha_bar_0 = 1, free of 0/0)
        return torch.zeros_like(at(sched.alpha_bar, t))
    one_minus_ratio = -torch.expm1(at(sched.log_alpha_bar, t) - at(sched.log_alpha_bar, s))  # 1 - a_t / a_s
    return eta * (at(sched.one_minus_alpha_bar, s) / at(sched.one_minus_alpha_bar, t) * one_minus_ratio).clamp_min(0).sqrt()


# slide "DDIM": x_s = sqrt(a_s) f_theta(x_t) + sqrt(1 - a_s - sigma^2) eps_theta(x_t) + sigma eps, s = the previous tau
def ddim_step(sched, x_t, eps, t, s, eta, noise):
    """One step of the generative process from timestep t to s < t (s = 0: x_0, where sigma = 0)."""
    sigma = ddim_sigma(sched, t, s, eta)
    x0 = predict_x0(sched, x_t, eps, t)  # "predicted x_0"
    direction = (at(sched.one_minus_alpha_bar, s) - sigma ** 2).clamp_min(0).sqrt() * eps  # "direction pointing to x_t"
    return at(sched.sqrt_alpha_bar, s) * x0 + direction + sigma * noise  # + "random noise"


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, sched, tau, x_T, eta, run=None):
    """DDIM's generalized sampler (eq. 12 on the sub-sequence tau, sec. 4.2): x_T -> x_0 in len(tau) network
    evaluations, returned as images in [0, 1]. eta = 0 is deterministic; the last step (to alpha_bar_0 = 1) has no noise."""
    x, n, C = x_T.to(torch.promote_types(x_T.dtype, torch.float32)), len(x_T), x_T.shape[1]  # fp32 (fp64 kept)
    prev = torch.cat([tau.new_zeros(1), tau[:-1]])  # tau_{i-1}, with tau_0 = 0
    for i in reversed(range(len(tau))):
        t, s = (torch.full((n,), int(v), device=x.device, dtype=torch.long) for v in (tau[i], prev[i]))
        with run.autocast() if run else contextlib.nullcontext():
            eps = model(x, t)[:, :C].to(x.dtype)
        x = ddim_step(sched, x, eps, t, s, eta, torch.randn_like(x) if eta > 0 and i > 0 else 0.0)
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode(model, sched, tau, x0, run=None):
    """x_0 in [-1, 1] -> x_T: the eta = 0 process run forwards along tau (DDIM eq. 13, the other direction)."""
    x, n, C = x0.to(torch.promote_types(x0.dtype, torch.float32)), len(x0), x0.shape[1]
    prev = torch.cat([tau.new_zeros(1), tau[:-1]])
    for i in range(len(tau)):
        s, t = (torch.full((n,), int(v), device=x.device, dtype=torch.long) for v in (prev[i], tau[i]))
        with run.autocast() if run else contextlib.nullcontext():
            eps = model(x, s.clamp_min(1))[:, :C].to(x.dtype)  # at x_0 (s = 0): the network's first timestep, t = 1
        x = ddim_step(sched, x, eps, s, t, 0.0, 0.0)  # the same map with the roles of s and t swapped
    return x


def slerp(z1, z2, alpha):
    """Spherical interpolation between x_T's (B, ...): sin((1-alpha) theta)/sin theta z1 + sin(alpha theta)/sin theta z2."""
    a, b = z1.flatten(1), z2.flatten(1)
    theta = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp_min(1e-6)[:, None]  # (B, 1)
    return ((torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)).view_as(z1)


def sample_many(model, sched, tau, x_T, eta, run, batch):
    """sample() in chunks of `batch`; returns images on the CPU and images/s."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    x = torch.cat([sample(model, sched, tau, xb.to(run.device), eta, run).cpu() for xb in x_T.split(batch)])
    return x, len(x) / (time.time() - t0)


@torch.no_grad()
def fd_table(model, sched, data, cfg, run, n):
    """The slide's Table 1 at small scale: FD of n samples for every S x eta, the same x_T in every cell, cheap
    columns first. table.md is rewritten after every cell ('-': not yet); table.png holds 8 samples per cell."""
    steps, etas = ints(cfg.table_steps), floats(cfg.table_etas)
    x_T = torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(cfg.seed))
    fd, rows, label = {}, {}, common.fd_label(cfg)
    for S in steps:
        for eta in etas:
            torch.manual_seed(cfg.seed + 1)  # the same noise stream in every stochastic cell, independent of x_T's
            tau = make_tau(cfg.T, S, cfg.tau)
            x, ips = sample_many(model, sched, tau, x_T, eta, run, cfg.eval_batch)
            fd[eta, S], rows[eta, S] = common.frechet_distance(x, data, cfg, run), x[:8]
            run.print(f"table: eta {eta:g}, S {len(tau)}: FD {fd[eta, S]:.2f} ({n} samples, {ips:.2f} images/s)")
            lines = [f"{label} of {n} samples vs {min(n, len(data.test))} test images; {data.name}; tau {cfg.tau}; "
                     f"checkpoint {cfg.ckpt} ({'EMA' if cfg.use_ema else 'raw'} weights)", "",
                     "| eta \\ S | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
            lines += [f"| {e:g} | " + " | ".join(f"{fd[e, s]:.2f}" if (e, s) in fd else "-" for s in steps) + " |" for e in etas]
            (run.out / "table.md").write_text("\n".join(lines) + "\n")
    common.save_grid(torch.cat([rows[e, s] for e in etas for s in steps]), run.out / "table.png", nrow=8)
    return (run.out / "table.md").read_text()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """No likelihood (eta = 0 is an implicit model): test L_simple on cfg.eval_n test images (seeded t and eps),
    reconstruction MSE per dimension on [0, 1] after encode -> decode with S steps (DDIM Table 2), FD of
    cfg.eval_samples samples with (S, eta), network evaluations per sample and images/s."""
    model.eval()
    sched, tau = make_schedule(cfg).to(run.device), make_tau(cfg.T, cfg.steps_sample, cfg.tau)
    g, losses, sq, n = torch.Generator().manual_seed(0), [], 0.0, 0
    for x in common.test_batches(data, cfg, run.device, min(cfg.eval_batch, 100), f"L_simple, encode -> decode with S = {len(tau)}"):
        x0 = 2 * x - 1
        t = torch.randint(1, cfg.T + 1, (len(x0),), generator=g).to(run.device)
        eps = torch.randn(x0.shape, generator=g).to(run.device)
        with run.autocast():
            out = model(q_sample(sched, x0, t, eps), t)[:, : x0.shape[1]].float()
        losses.append((eps - out).pow(2).flatten(1).mean(1))
        x_rec = sample(model, sched, tau, encode(model, sched, tau, x0, run), 0.0, run)  # x_0 -> x_T -> x_0, eta = 0
        sq, n = sq + (x_rec - x).pow(2).sum().item(), n + x.numel()
    extras = dict(test_loss_simple=torch.cat(losses).mean().item(), recon_mse=sq / n, S=len(tau), eta=cfg.eta, tau=cfg.tau)
    if cfg.eval_samples:
        run.print(f"evaluate: drawing {cfg.eval_samples} samples with S = {len(tau)}, eta = {cfg.eta:g} (images/s, FD)")
        x_T = torch.randn(cfg.eval_samples, *data.shape, generator=torch.Generator().manual_seed(12345))  # not noise's
        x, ips = sample_many(model, sched, tau, x_T, cfg.eta, run, cfg.eval_batch)
        extras.update(nfe=len(tau), images_per_s=ips, fd=common.frechet_distance(x, data, cfg, run), fd_kind=common.fd_label(cfg))
    model.train()
    return common.eval_record(step, None, "bpd", None, len(torch.cat(losses)), **extras)


# ----------------------------------------------------------------------------- train
def train(cfg):
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"ddim.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    sched, tau = make_schedule(cfg).to(run.device), make_tau(cfg.T, cfg.steps_sample, cfg.tau)
    model = UNet(cfg, data.shape).to(run.device)
    if run.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = common.EMA(model, cfg.ema, cfg.ema_warmup)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run, hflip=cfg.hflip)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, ema=ema)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    run.print(f"U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | T {cfg.T} {cfg.schedule} | "
              f"samples: S {len(tau)} ({cfg.tau}), eta {cfg.eta:g}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, ema=ema, optimizer=opt, batches=batches, update=update,
                               shape=list(data.shape))

    def save_images():
        x_T = torch.randn(cfg.grid, *data.shape, device=run.device)
        common.save_grid(sample(ema.model, sched, tau, x_T, cfg.eta, run), run.out / f"samples_{step}.png")

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:  # linear warm-up (Python numbers: no host sync)
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            x = next(batches)
            with run.autocast():
                loss, terms = loss_simple(net, sched, x)
            opt.zero_grad(set_to_none=True)
            update(loss)
            ema.update(model, step + 1)  # update t = step + 1 (decay warm-up)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(ema.model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images()
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        save_images()
        log.write(evaluate(ema.model, data, cfg, run, step))
    return model, ema


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in argv)
    if given("--ckpt") and not any(map(given, ("--resume", "--eval", "--sample"))):
        argv += ["--sample", "64"]  # pointed at a checkpoint: sample from it, never train over it
    cfg = resolve(common.parse_config(Config, PRESETS, METHOD, argv, accept=("ddpm",)))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD, "ddpm"))
    if ckpt["method"] == "ddpm":  # write next to ddim's runs, not into ddpm's run folder; the preset's tau
        cfg.out = cfg.out if given("--out") else os.path.join("runs", METHOD, cfg.dataset)
        cfg.tau = cfg.tau if given("--tau") else PRESETS.get(cfg.dataset, {}).get("tau", cfg.tau)
    run = common.setup(cfg, METHOD, train=False)
    model = UNet(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["ema" if cfg.use_ema else "model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    sched, tau = make_schedule(cfg).to(run.device), make_tau(cfg.T, cfg.steps_sample, cfg.tau)
    data = common.load_data(cfg) if cfg.eval or cfg.table else None
    if cfg.sample:
        x_T = torch.randn(cfg.sample, *ckpt["shape"])
        x, ips = sample_many(model, sched, tau, x_T, cfg.eta, run, cfg.eval_batch)
        common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples, S {len(tau)} ({cfg.tau}), eta {cfg.eta:g}: {ips:.2f} images/s, {len(tau)} network "
              f"evaluations each -> {run.out / 'sample.png'}")
    if cfg.sample and cfg.interpolate:  # paper fig. 6: slerp(x_T^a, x_T^b, alpha), alpha in 0..1, decoded with eta = 0
        z1, z2 = torch.randn(2, cfg.interpolate, *ckpt["shape"])
        alphas = torch.linspace(0, 1, 10)
        z = torch.stack([slerp(z1, z2, a) for a in alphas], 1).flatten(0, 1)  # (rows * 10, C, H, W)
        x, _ = sample_many(model, sched, tau, z, 0.0, run, cfg.eval_batch)
        common.save_grid(x, run.out / "interpolate.png", nrow=10)
        print(f"{cfg.interpolate} interpolations of 10 -> {run.out / 'interpolate.png'}")
    if cfg.sample and cfg.table:
        print(fd_table(model, sched, data, cfg, run, cfg.sample), end="")
        print(f"-> {run.out / 'table.md'}, {run.out / 'table.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, data, cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
