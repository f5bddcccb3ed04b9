"""Denoising Diffusion Probabilistic Models (DDPM), and Improved DDPM (`--improved`).

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239.
Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672.
Slides: "Denoising Diffusion Probabilistic Models (DDPM)" and "Improved Denoising Diffusion Probabilistic Models".

A fixed forward (diffusion) Markov chain adds Gaussian noise to the data x_0 (8-bit images scaled to [-1, 1]) for
T steps; a learned reverse chain p_theta(x_{t-1}|x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)) removes it:

    q(x_t|x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),  alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s
    q(x_t|x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    q(x_{t-1}|x_t, x_0) = N(mu_tilde_t, beta_tilde_t I),  beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t))
    L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2                                    (Algorithm 1)
    L_vlb = KL(q(x_T|x_0) || N(0, I)) + sum_{t>1} KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) - log p_theta(x_0|x_1)
    DDPM: Sigma_theta = sigma_t^2 I, sigma_t^2 = beta_t (`--sigma beta`, Ho's CIFAR-10 model) or beta_tilde_t
    Improved: Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t),  L_hybrid = L_simple + lambda L_vlb, lambda = 0.001,
              with a stop-gradient on mu_theta inside L_vlb, and the cosine schedule
              alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, s = 0.008, beta_t <= 0.999.

Details as the official code (hojonathanho/diffusion, openai/improved-diffusion): t in 1..T is embedded sinusoidally;
v = (network output + 1) / 2; at t = 1 the fixed variances use beta_tilde_2 (beta_tilde_1 = 0); L_vlb is in bits/dim
and T * L_t estimates the sum over t; p(x_0|x_1) is a Gaussian integrated over each 8-bit bin (edge bins to +-inf),
so the bound is a discrete NLL in bits/dim with no offset. `--t-sampling importance`: t ~ p_t proportional to
sqrt(E[loss^2]) over the last 10 per-example training losses at each t (the official code records the whole loss;
uniform until every t has 10), the loss weighted by 1/(T p_t).
`--sample-steps S` respaces sampling onto S of the T steps: beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}.
Precision: every schedule constant is computed in fp64 and stored (as the official code), and L_t's KL is written
without fp32 cancellation (vlb_term; the official code subtracts two fp32 means): fp32 L_t within 4e-6 of fp64.
Sampling is Algorithm 2, with no noise at the last step; evaluate and sample use the EMA weights.

`--improved` changes exactly three things: cosine schedule, learned variance (2C output channels) and L_hybrid.
The paper's best CIFAR-10 runs also used T = 4000, lr 1e-4, dropout 0.3, 3 res blocks: pass them as flags.
Simplifications: none in the objective; the `fashion-mnist` preset is a 4x narrower U-Net (32 channels, multipliers
1,2,2: 28 -> 14 -> 7, attention at 7, 1 res block per level), batch 64, lr 5e-4 after 200 warm-up steps, EMA 0.999,
no flips, 3000 steps, 16-sample grids, evaluated on 20 test images (1000 network evaluations per image), for CPU.

Run:
    python ddpm.py                                          # fashion-mnist, small U-Net on CPU
    python ddpm.py --dataset cifar10 --compile              # the paper's CIFAR-10 run (800k steps) on a GPU
    python ddpm.py --dataset cifar10 --improved             # Improved DDPM: cosine, learned sigmas, L_hybrid
    python ddpm.py --eval --ckpt runs/ddpm/fashion-mnist/ckpt.pt --eval-n 200
    python ddpm.py --sample 64 --ckpt runs/ddpm/fashion-mnist/ckpt.pt --sample-steps 100

Results (2 CPU cores shared with other jobs, OMP_NUM_THREADS=1; no GPU run yet, so no paper-scale number here):
    cifar10 preset: 35.75M parameters (the paper: 35.7M); CPU s/step, 3 steps of batch 128 on random 3x32x32 data
      (cifar10 files absent): 104, 66, 63 s - a GPU preset; GPU s/step, bound and FD not yet measured.
    fashion-mnist preset: 1.11M parameters, CPU ~1.0 s/step (1.0 it/s at batch 64).
    `python ddpm.py --steps 900 --ema 0.99 --eval-n 8 --eval-samples 8` (15 min; before issue 12's fp64 constants):
      train L_simple 0.050 (quartiles q0..q3 0.157, 0.032, 0.008, 0.003); EMA test bound 4.04 bpd on only 8 test
      images (prior 0.00002 + sum L_t 2.43 + decoder 1.60); sampling 0.20 images/s at 1000 network evaluations per
      sample; samples still mostly saturated blocks (FD 1011 from 8 samples: not meaningful).
    `python ddpm.py` (the preset: 3000 steps of batch 64; 1.0 it/s on one core, OMP_NUM_THREADS=1, the other
      core busy; resumed once at step 1000): train L_simple 0.044 (quartiles 0.145, 0.027, 0.0062, 0.0014); EMA
      test bound 3.640 bpd on the preset's 20 test images (prior 0.00002 + sum L_t 2.124 + decoder 1.515); 0.17
      images/s at 1000 evaluations per sample (batch 16); FD 259.3 from 16 samples (too few to compare with
      anything). Before the fp64 constants and the EMA warm-up (issue 12): 3.769 bpd (sum L_t 2.208, decoder
      1.561), FD 401.8.
For reference, the slides' table (not reproduced here): CIFAR-10 bound 3.70 bpd (DDPM), 2.94 (Improved DDPM).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "ddpm"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    improved: bool = False  # Improved DDPM: 'auto' below becomes cosine / learned / hybrid (else linear / beta / simple)
    T: int = 1000  # diffusion steps
    schedule: str = common.choice("auto", "linear", "cosine")  # beta schedule (auto: linear, or cosine with --improved)
    beta_1: float = 1e-4  # linear schedule: first beta
    beta_T: float = 0.02  # linear schedule: last beta
    sigma: str = common.choice("auto", "beta", "beta_tilde", "learned")  # reverse variance (auto: beta, or learned with --improved)
    loss: str = common.choice("auto", "simple", "hybrid", "vlb")  # objective (auto: simple, or hybrid with --improved)
    vlb_weight: float = 0.001  # lambda in L_hybrid = L_simple + lambda L_vlb
    t_sampling: str = common.choice("uniform", "importance")  # how t is drawn in training
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
    sample_steps: int = 0  # sampling steps S (respaced; 0 = all T)
    clip_x0: bool = False  # sampling: clip the predicted x_0 to [-1, 1] (the official samplers do)
    grid: int = 64  # samples in each samples_<step>.png
    eval_samples: int = 64  # samples drawn by evaluate (images/s, FD)
    eval_batch: int = 500  # network inputs per batch in evaluate (test images x timesteps)


PRESETS = {
    "cifar10": dict(T=1000, beta_1=1e-4, beta_T=0.02, channels=128, ch_mult="1,2,2,2", res_blocks=2, attn_res="16",
                    dropout=0.1, lr=2e-4, batch_size=128, warmup=5000, grad_clip=1.0, ema=0.9999, steps=800_000,
                    log_every=1000, ckpt_every=10000, eval_every=100_000, eval_n=1000, eval_batch=2000),
    "fashion-mnist": dict(T=1000, channels=32, ch_mult="1,2,2", res_blocks=1, attn_res="7", dropout=0.1, lr=5e-4,
                          batch_size=64, warmup=200, ema=0.999, hflip=False, steps=3000, log_every=100,
                          ckpt_every=1000, eval_n=20, eval_samples=16, eval_batch=500, grid=16),
}


def resolve(cfg):
    """Turn the 'auto' choices into DDPM's or Improved DDPM's, and check the rest."""
    cfg.schedule = {"auto": "cosine" if cfg.improved else "linear"}.get(cfg.schedule, cfg.schedule)
    cfg.sigma = {"auto": "learned" if cfg.improved else "beta"}.get(cfg.sigma, cfg.sigma)
    cfg.loss = {"auto": "hybrid" if cfg.improved else "simple"}.get(cfg.loss, cfg.loss)
    for flag, v, lo in (("--T", cfg.T, 2), ("--channels", cfg.channels, 1), ("--res-blocks", cfg.res_blocks, 1),
                        ("--sample-steps", cfg.sample_steps, 0), ("--eval-batch", cfg.eval_batch, 1)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    if cfg.sample_steps > cfg.T:
        common.fail(f"--sample-steps {cfg.sample_steps} out of range; accepted: 0..T ({cfg.T})")
    try:
        ints(cfg.ch_mult), ints(cfg.attn_res)
    except ValueError:
        common.fail(f"--ch-mult {cfg.ch_mult!r} / --attn-res {cfg.attn_res!r}: expected comma-separated integers")
    return cfg


def ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


# ----------------------------------------------------------------------------- schedules
class Schedule(nn.Module):
    """Every constant of the forward process, index t = 0..T (index 0: x_0 itself, alpha_bar_0 = 1), computed in fp64
    and stored in dtype; the objective and samplers use only these (no 1 - alpha_bar from a stored alpha_bar near 1).
    `betas64` and `alpha_bar64` stay fp64 on the CPU (not buffers): respacing starts from them.
    `steps` are the network's timesteps of each index (respacing keeps the original t the network was trained on)."""

    def __init__(self, betas, steps=None, dtype=torch.float32):
        super().__init__()
        T = len(betas)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas.double()])  # computed in fp64, stored in dtype
        reg = lambda name, v: self.register_buffer(name, v.to(dtype) if name != "steps" else v, persistent=False)
        alpha_bar = torch.cumprod(1 - betas, 0)  # alpha_bar_t = prod_{s<=t} (1 - beta_s)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])  # alpha_bar_{t-1}
        one_minus, div = 1 - alpha_bar, (1 - alpha_bar).clamp_min(1e-20)  # 1 - alpha_bar_t, and as a divisor (index 0: 0)
        beta_tilde = (1 - prev) / div * betas  # beta_tilde_t = (1-alpha_bar_{t-1})/(1-alpha_bar_t) beta_t
        beta_tilde[0] = 0
        first = beta_tilde[2] if T > 1 else betas[1]  # beta_tilde_1 = 0: its log is replaced by log beta_tilde_2 (official code)
        reg("betas", betas)
        reg("alphas", 1 - betas)  # alpha_t = 1 - beta_t
        reg("alpha_bar", alpha_bar)
        reg("alpha_bar_prev", prev)
        reg("sqrt_alpha_bar", alpha_bar.sqrt())  # sqrt(alpha_bar_t)
        reg("sqrt_one_minus_alpha_bar", one_minus.sqrt())  # sqrt(1 - alpha_bar_t)
        reg("log_one_minus_alpha_bar", div.log())  # log(1 - alpha_bar_t)
        reg("sqrt_recip_alpha_bar", alpha_bar.rsqrt())  # 1 / sqrt(alpha_bar_t)
        reg("sqrt_recipm1_alpha_bar", (one_minus / alpha_bar).sqrt())  # sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)
        reg("sqrt_recip_alphas", (1 - betas).rsqrt())  # 1 / sqrt(alpha_t)
        reg("coef_eps", betas / div.sqrt())  # beta_t / sqrt(1 - alpha_bar_t)
        reg("beta_tilde", beta_tilde)
        log_beta, log_beta_tilde = betas.clamp_min(1e-20).log(), torch.cat([beta_tilde[:1], first[None], beta_tilde[2:]]).clamp_min(1e-20).log()
        reg("log_beta_tilde", log_beta_tilde)
        reg("log_beta", log_beta)
        reg("log_beta_fixed", torch.cat([betas[:1], first[None], betas[2:]]).clamp_min(1e-20).log())  # Ho: "fixedlarge"
        reg("log_beta_over_beta_tilde", log_beta - log_beta_tilde)  # log(beta_t / beta_tilde_t)
        reg("coef_x0", prev.sqrt() * betas / div)  # sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
        reg("coef_xt", (1 - betas).sqrt() * (1 - prev) / div)  # sqrt(alpha_t)(1-alpha_bar_{t-1})/(1-alpha_bar_t)
        reg("steps", torch.arange(T + 1) if steps is None else torch.cat([torch.zeros(1, dtype=torch.long), steps]))
        self.T, self.betas64, self.alpha_bar64 = T, betas, alpha_bar


def linear_betas(T, beta_1, beta_T):
    """Ho et al.: beta_t rises linearly from beta_1 = 1e-4 to beta_T = 0.02."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2;
    beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at 0.999."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_schedule(cfg):
    return Schedule(cosine_betas(cfg.T) if cfg.schedule == "cosine" else linear_betas(cfg.T, cfg.beta_1, cfg.beta_T))


def respace(sched, S):
    """Improved DDPM sec. 4: S of the T steps, evenly spaced and ending at T; new betas from alpha_bar on the
    sub-sequence, beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} (alpha_bar_{t_0} = 1), in fp64."""
    T = sched.T
    t = torch.linspace(1, T, S, dtype=torch.float64).round().long() if S > 1 else torch.tensor([T])
    ab = sched.alpha_bar64[t]  # fp64, not the stored buffer
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return Schedule(betas, steps=t, dtype=sched.alpha_bar.dtype).to(sched.alpha_bar.device)


# ----------------------------------------------------------------------------- networks
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


# slide "DDPM": x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t|x_0)
def q_sample(sched, x0, t, eps):
    return at(sched.sqrt_alpha_bar, t) * x0 + at(sched.sqrt_one_minus_alpha_bar, t) * eps


# slide "DDPM", Bayes: q(x_{t-1}|x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t I)
def q_posterior(sched, x0, x_t, t):
    return at(sched.coef_x0, t) * x0 + at(sched.coef_xt, t) * x_t, at(sched.beta_tilde, t)


def p_mean_variance(sched, out, x_t, t, sigma, clip_x0=False):
    """The network output -> mean and log-variance of p_theta(x_{t-1}|x_t), fp32.
    slide "DDPM": mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta);
    slide "Improved DDPM": Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t), v = (output + 1)/2."""
    out, C = out.to(torch.promote_types(out.dtype, torch.float32)), x_t.shape[1]  # >= fp32 (autocast gives bf16)
    eps = out[:, :C]
    if clip_x0:  # the same mean, written through the clipped x_0 prediction: mu_tilde(x_t, clip(x0_hat))
        # x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)
        x0 = (at(sched.sqrt_recip_alpha_bar, t) * x_t - at(sched.sqrt_recipm1_alpha_bar, t) * eps).clamp(-1, 1)
        mean = q_posterior(sched, x0, x_t, t)[0]
    else:
        mean = at(sched.sqrt_recip_alphas, t) * (x_t - at(sched.coef_eps, t) * eps)
    if sigma == "learned":
        v = (out[:, C:] + 1) / 2  # log_var = v log beta_t + (1 - v) log beta_tilde_t, as a difference from log beta_tilde_t
        log_var = at(sched.log_beta_tilde, t) + v * at(sched.log_beta_over_beta_tilde, t)
    else:
        log_var = at(sched.log_beta_fixed if sigma == "beta" else sched.log_beta_tilde, t).expand_as(mean)
    return mean, log_var


def normal_kl(mu1, logvar1, mu2, logvar2):
    """KL(N(mu1, e^logvar1) || N(mu2, e^logvar2)) per dimension."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mu1 - mu2) ** 2 * torch.exp(-logvar2))


def log_diff_ndtr(a, b):
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails (Phi(b)-Phi(a) = Phi(-a)-Phi(-b))."""
    hi, lo = torch.where(a > 0, -a, b), torch.where(a > 0, -b, a)
    return torch.special.log_ndtr(hi) + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - torch.special.log_ndtr(hi)).clamp(max=1 - 1e-12))


# Ho et al. eq. 13: p(x_0|x_1) = prod_i integral over the 8-bit bin of x_0^i of N(x; mu_theta^i, sigma_1^2), edges to +-inf
def decoder_nll(x0, mean, log_var):
    """-log p(x_0|x_1) per dimension, x_0 on the grid -1 + 2k/255."""
    inv_s = torch.exp(-0.5 * log_var)
    lo = torch.where(x0 < -0.999, -math.inf, (x0 - 1 / 255 - mean) * inv_s)
    hi = torch.where(x0 > 0.999, math.inf, (x0 + 1 / 255 - mean) * inv_s)
    return -log_diff_ndtr(lo, hi)


# slide "DDPM", L_vlb: L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) for t > 1, L_0 = -log p(x_0|x_1)
def vlb_term(sched, out, x0, x_t, t, sigma):
    """(B,) L_{t-1} in bits/dim at each example's t. The KL is normal_kl(mu_tilde, log beta_tilde_t, mu_theta, log sigma_t^2)
    written without fp32 cancellation (the two means, and the two log-variances, differ by far less than their size):
    mu_theta - mu_tilde = -beta_t / (sqrt(alpha_t) sqrt(1 - alpha_bar_t)) (eps_theta - eps), eps the noise in x_t
    (mu_theta at the true eps is mu_tilde), and log sigma_t^2 - log beta_tilde_t = w log(beta_t / beta_tilde_t),
    w = 1 (beta), 0 (beta_tilde), v (learned)."""
    mean, log_var = p_mean_variance(sched, out, x_t, t, sigma)
    out, C = out.to(torch.promote_types(out.dtype, torch.float32)), x_t.shape[1]
    eps = (x_t - at(sched.sqrt_alpha_bar, t) * x0) / at(sched.sqrt_one_minus_alpha_bar, t)  # from q_sample's equation
    d_mu = at(sched.sqrt_recip_alphas, t) * at(sched.coef_eps, t) * (out[:, :C] - eps)  # mu_tilde - mu_theta (squared below)
    w = (out[:, C:] + 1) / 2 if sigma == "learned" else float(sigma == "beta")
    r = w * at(sched.log_beta_over_beta_tilde, t)  # log sigma_t^2 - log beta_tilde_t (t > 1)
    kl = 0.5 * (torch.expm1(-r) + r + d_mu ** 2 * torch.exp(-log_var))  # (r - 1 + e^-r + (mu_theta - mu_tilde)^2/sigma^2)/2
    nll = torch.where((t == 1)[:, None, None, None], decoder_nll(x0, mean, log_var), kl)
    return nll.flatten(1).mean(1) / math.log(2)


# slide "DDPM", L_T = KL(q(x_T|x_0) || N(0, I)) (no parameters)
def prior_kl(sched, x0):
    T = torch.full((len(x0),), sched.T, device=x0.device)
    mean, log_var = at(sched.sqrt_alpha_bar, T) * x0, at(sched.log_one_minus_alpha_bar, T)  # q(x_T|x_0)
    return normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1) / math.log(2)


class TSampler(nn.Module):
    """t ~ Uniform{1..T}, or (importance) p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of each t,
    uniform until each t has 10 (Nichol & Dhariwal sec. 3.3; 0.1% uniform mixed in). Returns t and 1/(T p_t)."""

    def __init__(self, T, importance, history=10):
        super().__init__()
        self.T, self.importance = T, importance
        self.register_buffer("losses", torch.zeros(T, history))
        self.register_buffer("count", torch.zeros(T, dtype=torch.long))

    def probs(self):
        w = self.losses.pow(2).mean(1).sqrt()
        p = 0.999 * w / w.sum().clamp_min(1e-30) + 0.001 / self.T
        ready = (self.count >= self.losses.shape[1]).all()  # a device tensor: no host sync
        return torch.where(ready, p, torch.full_like(p, 1 / self.T))

    def sample(self, n, device):
        if not self.importance:
            return torch.randint(1, self.T + 1, (n,), device=device), torch.ones(n, device=device)
        p = self.probs()
        t = torch.searchsorted(p.cumsum(0), torch.rand(n, device=device) * p.sum()).clamp(max=self.T - 1)  # inverse CDF
        return t + 1, 1 / (self.T * p[t])

    @torch.no_grad()
    def update(self, t, loss):
        """Every loss goes into its t's ring of the last 10: a t drawn k times in the batch fills k consecutive slots
        (k > 10: the last 10 of them, in batch order), vectorised, no host sync."""
        if self.importance:
            H, order = self.losses.shape[1], torch.argsort(t, stable=True)
            i, loss = t[order] - 1, loss[order].float()  # (B,) sorted by t, ties in batch order
            pos = torch.arange(len(i), device=i.device)
            first, end = torch.searchsorted(i, i), torch.searchsorted(i, i, right=True)  # each t's run [first, end)
            rank = pos - first  # 0, 1, ... within the run: slot count + rank
            newest = end - 1 - (end - 1 - pos) % H  # the last loss of the run that lands in the same slot
            self.losses[i, (self.count[i] + rank) % H] = loss[newest]  # repeated slots all write the same value
            self.count.index_add_(0, i, torch.ones_like(i))


# Algorithm 1 (training); slide "Improved DDPM": L_hybrid = L_simple + lambda L_vlb
def loss_fn(net, sched, x, cfg, t_sampler):
    """x in [0, 1] -> (loss, terms). L_simple per example is the mean over dimensions; L_vlb = T L_t (bits/dim),
    an unbiased estimate of the sum over t; in L_hybrid the mean inside L_vlb is detached (only Sigma learns from it)."""
    x0 = 2 * x - 1
    t, weight = t_sampler.sample(len(x0), x0.device)
    eps = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t, eps)
    if x0.is_cuda:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    out = net(x_t, t).float()
    C = x0.shape[1]
    mse = (eps - out[:, :C]).pow(2).flatten(1).mean(1)  # slide "DDPM": ||eps - eps_theta(x_t, t)||^2
    terms = {}
    if cfg.loss == "simple":
        per = mse
    else:
        vlb_out = torch.cat([out[:, :C].detach(), out[:, C:]], 1) if cfg.loss == "hybrid" else out  # stop-gradient on mu
        vlb = sched.T * vlb_term(sched, vlb_out, x0, x_t, t, cfg.sigma)
        per = mse + cfg.vlb_weight * vlb if cfg.loss == "hybrid" else vlb
        terms["vlb"] = vlb.mean()
    t_sampler.update(t, per.detach())
    loss = (weight * per).mean()
    q = (t - 1) * 4 // sched.T  # timestep quartile 0..3
    sums = torch.zeros(4, device=x.device).scatter_add(0, q, per.detach())
    counts = torch.zeros(4, device=x.device).scatter_add(0, q, torch.ones_like(per))
    by_q = torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)  # NaN: no t in that quartile (Logger skips it)
    return loss, {"loss": loss, "mse": mse.mean(), **terms, **{f"loss_q{i}": by_q[i] for i in range(4)}}


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, sched, shape, n, sigma, clip_x0=False, device="cpu"):
    """Algorithm 2: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at the
    last step (t = 1 returns the mean). `sched` may be respaced: its steps map to the network's timesteps."""
    x = torch.randn(n, *shape, device=device)
    for i in range(sched.T, 0, -1):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        mean, log_var = p_mean_variance(sched, model(x, sched.steps[t]), x, t, sigma, clip_x0)
        x = mean + torch.exp(0.5 * log_var) * torch.randn_like(x) if i > 1 else mean
    return ((x + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def bound_terms(model, sched, x0, sigma, max_batch):
    """The full variational bound per example, in bits/dim, fp32: prior KL, sum_{t>1} L_{t-1}, decoder -log p(x_0|x_1).
    Every t is evaluated on a fresh x_t ~ q(x_t|x_0); t is batched in chunks of max_batch // B."""
    B, T = len(x0), sched.T
    chunk, sum_L, dec = max(1, max_batch // B), x0.new_zeros(B), x0.new_zeros(B)
    for start in range(1, T + 1, chunk):
        ts = torch.arange(start, min(start + chunk, T + 1), device=x0.device)
        t = ts.repeat_interleave(B)  # (K*B,)
        xk = x0.repeat(len(ts), 1, 1, 1)  # (K*B, C, H, W)
        x_t = q_sample(sched, xk, t, torch.randn_like(xk))
        L = vlb_term(sched, model(x_t, sched.steps[t]), xk, x_t, t, sigma).view(len(ts), B)
        dec += (L * (ts == 1)[:, None]).sum(0)
        sum_L += (L * (ts > 1)[:, None]).sum(0)
    return prior_kl(sched, x0), sum_L, dec


@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test bound in bits/dim (kind "bound": prior + sum_t L_{t-1} + decoder, all T steps), its terms, and the
    sampler's cost (network evaluations per sample, images/s) with cfg.sample_steps."""
    model.eval()
    sched = make_schedule(cfg).to(run.device)
    parts = []
    for x in common.test_batches(data, cfg, run.device, max(1, min(cfg.eval_batch, 100)), f"variational bound over all T = {cfg.T} steps"):
        parts.append(torch.stack(bound_terms(model, sched, 2 * x - 1, cfg.sigma, cfg.eval_batch), 1))
    prior, sum_L, dec = torch.cat(parts).mean(0).tolist()
    extras = dict(prior=prior, sum_L=sum_L, decoder=dec, T=cfg.T, schedule=cfg.schedule, sigma=cfg.sigma, loss=cfg.loss)
    if cfg.eval_samples:
        s_sched = respace(sched, cfg.sample_steps) if cfg.sample_steps else sched
        run.print(f"evaluate: drawing {cfg.eval_samples} samples with {s_sched.T} steps (images/s, FD)")
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        x = sample(model, s_sched, data.shape, cfg.eval_samples, cfg.sigma, cfg.clip_x0, run.device)
        x.sum().item()  # wait for the device
        extras.update(nfe=s_sched.T, images_per_s=cfg.eval_samples / (time.time() - t0))
        extras.update(fd=common.frechet_distance(x, data, cfg, run), fd_kind=common.fd_label(cfg))
    model.train()
    return common.eval_record(step, prior + sum_L + dec, "bpd", "bound", len(torch.cat(parts)), **extras)


# ----------------------------------------------------------------------------- train
def train(cfg):
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"ddpm.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    sched = make_schedule(cfg).to(run.device)
    model = UNet(cfg, data.shape).to(run.device)
    if run.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema, t_sampler = common.EMA(model, cfg.ema, cfg.ema_warmup), TSampler(cfg.T, cfg.t_sampling == "importance").to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run, hflip=cfg.hflip)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, ema=ema, t_sampler=t_sampler)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    s_sched = respace(sched, cfg.sample_steps) if cfg.sample_steps else sched
    run.print(f"DDPM U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | T {cfg.T} {cfg.schedule} | "
              f"sigma {cfg.sigma} | loss {cfg.loss} | t {cfg.t_sampling}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, ema=ema, optimizer=opt, batches=batches, update=update,
                               t_sampler=t_sampler, shape=list(data.shape))

    def save_images():
        grid = sample(ema.model, s_sched, data.shape, cfg.grid, cfg.sigma, cfg.clip_x0, run.device)
        common.save_grid(grid, run.out / f"samples_{step}.png")

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:  # linear warm-up (Python numbers: no host sync)
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            x = next(batches)
            with run.autocast():
                loss, terms = loss_fn(net, sched, x, cfg, t_sampler)
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
def main():
    cfg = resolve(common.parse_config(Config, PRESETS, METHOD))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = UNet(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["ema"], cfg.ckpt)  # the EMA weights
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        sched = make_schedule(cfg).to(run.device)
        sched = respace(sched, cfg.sample_steps) if cfg.sample_steps else sched
        t = time.time()
        x = sample(model, sched, ckpt["shape"], cfg.sample, cfg.sigma, cfg.clip_x0, run.device).cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.2f} images/s, {sched.T} network evaluations each) "
              f"-> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
