"""EBM: p_theta(x) = exp(-E_theta(x)) / Z_theta, trained by the contrastive gradient with SGLD samples from a replay buffer.

An energy-based model learns only the unnormalized density exp(-E_theta(x)). Its maximum-likelihood gradient is the data's
energy gradient minus the model's; the model's expectation uses negative samples drawn by stochastic gradient Langevin
dynamics (SGLD), whose chains persist across training steps in a replay buffer.

LeCun et al., "A Tutorial on Energy-Based Learning", 2006; Du & Mordatch, "Implicit Generation and Generalization in Energy-Based
Models", arXiv 1903.08689 (IGEBM; code: openai/ebm_code_release); Welling & Teh, ICML 2011 (SGLD). Slides: "EBM" (the
unnormalized density, the data-minus-model gradient and the derivation of grad log Z, SGLD, the advantages: compositionality,
no generator network, adaptive computation time).

    p_theta(x) = exp(-E_theta(x)) / Z_theta,   Z_theta = int exp(-E_theta(x)) dx
    E_data[-grad_theta log p_theta(x)] = E_data[grad_theta E_theta(x)] - E_{x' ~ p_theta}[grad_theta E_theta(x')]
        (grad_theta log Z_theta = E_{p_theta}[-grad_theta E_theta(x)]), the gradient of
    loss = mean E(x+) - mean E(x-) + reg (mean E(x+)^2 + mean E(x-)^2),  x- SGLD samples held fixed (no gradient through the sampler)
    SGLD, the slide's (--sgld slide):  x^{k+1} = x^k - alpha/2 grad_x E(x^k) + eps,  eps ~ N(0, alpha),  k = 0 .. K-1
    SGLD as practised (--sgld decoupled): x^{k+1} = x^k - lambda clip(grad_x E(x^k), -c, c) + sigma z,  z ~ N(0, I)
The image presets use the decoupled form with the official code's lambda = 10, sigma = 0.005 (a temperature sigma^2 / (2
lambda) ~ 1e-6: nearly noiseless descent); the 2D preset uses the slide's form, a true Langevin sampler of p_theta.
Every chain stays in the data's box: images in [0, 1] (clamped, as the official code), 2D data in [-5, 5]^2 (reflected at the
walls, so that the chains' stationary density is p_theta on the box, the density whose NLL evaluate reports). Chains start from
the replay buffer with probability 95%, else from uniform noise (Du & Mordatch's Algorithm 1), and return to it after K steps.
Compositionality (`--condition both`): one network E(x | c) over two attribute sets, the class and "dark / light" (the image's
mean intensity below / above the training median); samples of E(x | c1) + E(x | c2) (c1 and c2) and E(x | c1) - w E(x | c2)
(c1 and not c2), each scored by common.classify's class and the mean intensity.

As the official code (train.py, models.py, utils.py, custom_adam.py; the README's CIFAR-10 command): images in [0, 1] as
(k + u) / 256 (uniform dequantization), chains started uniform on [0, 1]^D; the ResNet energy of ResNet32Large (a 3 x 3 conv,
then 3 stages of `blocks` residual blocks at widths w, 2w, 4w, the first block of each stage ending in a 2 x 2 average pool;
a block is h = conv1(x + b1[c]), leaky ReLU 0.2, h = conv2(h + b2[c]) g[c], out = leaky ReLU(pool(h + skip(x))), skip a 3 x 3
conv where the width changes; convs without bias; the last conv of a block starts at ~0, so blocks start as the identity;
then ReLU, a sum over positions and a linear map to E, the only layer without spectral normalization); per-condition input
biases b1, b2 and gains g as the code's conditional model (--cclass); spectral normalization with one power iteration, the
blocks' last convs only capped at norm 1; SGLD decoupled with lambda = 10, sigma = 0.005, the gradient clipped elementwise to
[-0.01, 0.01] (proj_norm), 60 steps (the code's default without the README's flag: 20); the loss above with reg = 1; Adam
(beta1 0, beta2 0.999) at the code's default lr 3e-4, its gradient elements first clipped to 3 sqrt(v_hat) + 0.1
(custom_adam.py; `--adam-clip`); the buffer holds uint8 images (compressed as floor(256 x), read back as (k + u) / 256),
50000 of them in the cifar10 preset (train.py). Differences: the slide's order (gradient at x^k, then noise) where the
code adds the noise first; no dropout (the code's ResNet32Large has a dropout flag in its blocks); no KL term (the README's
commands pass --zero_kl); the conditional model keeps ResNet32Large's shape and its final ReLU (the code's conditional
command uses ResNet32, with a leaky ReLU there); buffer chains keep their condition (the code restarts them under the
current batch's labels); one network with two attribute sets for the composition (the paper composes separately trained
conditional models); the power iteration runs on training forwards only (the code's runs in every SGLD step too); weights
start at PyTorch's default initialisation (the code: N(0, 1) under spectral normalization, where only the direction matters,
Xavier without it and for the output layer);
`--steps` (the code runs until stopped).
2D data: an MLP (SiLU) energy without spectral normalization, the slide's SGLD (alpha 0.02) reflected at the walls of the
box [-5, 5]^2 (no test point of common's seven sets lies outside), reg 0.1, Adam (0.9, 0.999) at lr 1e-3, no Adam clipping
(ours: with spectral normalization the NLL on 8gaussians was 3.99 nats after 10000 steps; reg 0 was unstable); Z is
integrated on a grid and evaluate reports the exact test NLL in nats.
Metrics: 2D: the exact test NLL (kind exact: log Z by the midpoint rule on a z_grid^2 grid over the box), MMD^2 of fresh and
buffer samples against test points; images (no tractable Z: test_nll is null, as DESIGN.md says for EBMs): the energy gap
mean E(test) - mean E(samples) (near 0 when samples look like data to the model; the health signal), FD and the IS-like
score of fresh chains (eval_K steps from noise) and of the replay buffer, SGLD cost (gradient evaluations and s per sample).
Presets: `toy` (every 2D set: MLP 3 x 128, K 20, 10000 steps x 256, fresh chains of 2000 steps); `fashion-mnist` / `mnist`
(CPU: w 16, 1 block per stage (0.10M parameters), K 20, batch 32, 1500 steps, 60 SGLD steps for fresh samples, reg 0.1:
at the paper's reg 1 the energies stay within +-0.5, the input gradients on noise are ~6e-4 per pixel and fresh chains
barely leave the noise); `cifar10` (the official README's unconditional command: ResNet32Large w 128, 3 blocks per stage,
18.6M parameters, K 60, batch 128, reg 1, buffer 50000).

Run:
    python ebm.py --dataset 8gaussians             # exact test NLL by the grid, density.png, MMD
    python ebm.py                                  # fashion-mnist: FD, IS-like, energy gap of fresh and buffer samples
    python ebm.py --condition both --out runs/ebm/fashion-compose   # E(x | class), E(x | dark / light): compose.png
    python ebm.py --sample 64 --eval-K 200         # samples.png, sgld_steps.png (coarse to fine), buffer.png

Results (2 CPU cores; README has the tables and the commands):
    `python ebm.py` (fashion-mnist, 9 min 24 s alone on 2 threads): fresh chains (60 SGLD steps from noise, 0.029 s per
    sample) FD 757.9, IS-like 1.01; the replay buffer FD 402.6, IS-like 1.70; energy gap test - fresh -9.49, near the
    regulariser's bound -1/reg (the net tells data from its chains). Fresh chains collapse to one or two shapes.
    `python ebm.py --dataset D` (10000 steps x 256, 5-6 min on one thread): exact test NLL in nats 8gaussians 2.923 (seed 1:
    2.897), checkerboard 3.616, moons 2.439, circles 3.309, pinwheel 2.380, swissroll 2.714, 2spirals 2.764.
    `--condition both --steps 3000`: E(x | c) + E(x | light) gives 100% light samples, + E(x | dark) 77% (E(x | c) alone:
    90%); the class is near chance (13% of the buffer's class chains). The mnist and cifar10 presets: not yet measured.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import common

METHOD = "ebm"
LIM = 5.0  # 2D data: the model's box [-LIM, LIM]^2 (chains start uniform on it and stay in it; log Z is integrated over it)


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    K: int = 60  # SGLD steps per training iteration (k = 0 .. K-1)
    sgld: str = common.choice("decoupled", "slide")  # slide: x - alpha/2 grad E + N(0, alpha); decoupled: x - step_size clip(grad E) + noise z
    alpha: float = 0.02  # slide SGLD: the step alpha
    step_size: float = 10.0  # decoupled SGLD: lambda (official step_lr)
    noise: float = 0.005  # decoupled SGLD: std sigma of the noise per step
    langevin_clip: float = 0.01  # clip each element of grad_x E to [-c, c] before the step (official proj_norm; 0 = none)
    buffer_size: int = 10000  # replay buffer: persistent chains kept
    reinit: float = 0.05  # fraction of chains started from uniform noise, the rest from the buffer
    reg: float = 1.0  # the regulariser reg (mean E(x+)^2 + mean E(x-)^2) (Du & Mordatch's alpha)
    beta1: float = 0.0  # Adam beta1 (official: 0; beta2 0.999)
    adam_clip: float = 3.0  # clip gradient elements to adam_clip sqrt(v_hat) + 0.1 before Adam (official custom_adam.py; 0 = off)
    width: int = 128  # image ResNet: channels of the first stage (w, 2w, 4w)
    blocks: int = 3  # image ResNet: residual blocks per stage (3 stages)
    spectral_norm: bool = True  # spectral normalization of every conv / hidden linear map (not the output layer)
    hidden: int = 128  # 2D MLP: hidden units
    layers: int = 3  # 2D MLP: hidden layers
    condition: str = common.choice("none", "both", "class", "brightness")  # E(x) or E(x | c): the class, dark / light, or either (composition)
    neg_weight: float = 0.5  # composition: w of the difference E(x | c1) - w E(x | c2)
    dequantize: bool = True  # images: x = (k + u) / 256 (official); off: x = k / 255
    eval_K: int = 0  # SGLD steps of fresh chains from noise in evaluate / --sample (0 = K)
    eval_samples: int = 1000  # evaluate: fresh samples (and buffer samples) scored by FD / IS-like (images) or MMD (2D)
    eval_batch: int = 500  # chains per batch in evaluate and sampling
    compose_n: int = 10  # composition: samples per class and composition (images, --condition both)
    z_grid: int = 1000  # 2D: grid points per side for log Z (the midpoint rule on the box)
    grid: int = 64  # samples in each samples_<step>.png (2D: points in its histogram)

PRESETS = {
    "fashion-mnist": dict(width=16, blocks=1, K=20, batch_size=32, lr=3e-4, reg=0.1, steps=1500, buffer_size=10000, log_every=100,
                          ckpt_every=500, eval_n=1000, eval_samples=500, eval_batch=250, eval_K=60),
    "toy": dict(sgld="slide", alpha=0.02, langevin_clip=0.0, spectral_norm=False, K=20, hidden=128, layers=3, batch_size=256, lr=1e-3, beta1=0.9,
                adam_clip=0.0, reg=0.1, steps=10000, log_every=1000, ckpt_every=2500, eval_K=2000, eval_samples=5000,
                eval_batch=5000, grid=10000),
    "cifar10": dict(width=128, blocks=3, K=60, batch_size=128, lr=3e-4, steps=100_000, buffer_size=50000, log_every=100,
                    ckpt_every=5000, eval_samples=10000, eval_n=10000, eval_batch=500, eval_K=60),
}
PRESETS["mnist"] = PRESETS["fashion-mnist"]

def resolve(cfg, kind=None, labelled=True):
    for flag, v, lo in (("--K", cfg.K, 1), ("--buffer-size", cfg.buffer_size, 1), ("--width", cfg.width, 1), ("--blocks", cfg.blocks, 1),
                        ("--hidden", cfg.hidden, 1), ("--layers", cfg.layers, 1), ("--eval-K", cfg.eval_K, 0), ("--eval-samples", cfg.eval_samples, 0),
                        ("--eval-batch", cfg.eval_batch, 1), ("--compose-n", cfg.compose_n, 1), ("--z-grid", cfg.z_grid, 2), ("--grid", cfg.grid, 1)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    for flag, v in (("--alpha", cfg.alpha), ("--step-size", cfg.step_size)):
        if not v > 0:
            common.fail(f"{flag} {v} out of range; accepted: > 0")
    for flag, v in (("--noise", cfg.noise), ("--langevin-clip", cfg.langevin_clip), ("--reg", cfg.reg), ("--adam-clip", cfg.adam_clip),
                    ("--neg-weight", cfg.neg_weight)):
        if not v >= 0:
            common.fail(f"{flag} {v} out of range; accepted: >= 0")
    if not 0 <= cfg.reinit <= 1 or not 0 <= cfg.beta1 < 1:
        common.fail(f"--reinit {cfg.reinit} / --beta1 {cfg.beta1}: accepted 0 <= reinit <= 1, 0 <= beta1 < 1")
    if kind and kind not in ("image", "toy"):
        common.fail(f"ebm.py models images and 2D data; --dataset {cfg.dataset} holds {kind} data")
    if kind == "toy" and cfg.condition != "none":
        common.fail(f"--condition {cfg.condition}: 2D data has no attributes; accepted there: none")
    if kind == "image" and cfg.condition in ("class", "both") and not labelled:
        common.fail(f"--condition {cfg.condition} needs class labels; --dataset {cfg.dataset} has none (accepted: none, brightness)")
    if cfg.buffer_size < cfg.batch_size:
        common.fail(f"--buffer-size {cfg.buffer_size} is smaller than --batch-size {cfg.batch_size}; accepted: >= the batch size")
    return cfg

def n_conditions(cfg, n_classes):  # condition indices: the classes 0 .. n_classes - 1, then dark, light (with `both`)
    return {"none": 1, "class": n_classes, "brightness": 2, "both": n_classes + 2}[cfg.condition]


# ----------------------------------------------------------------------------- networks
class SpectralNorm(nn.Module):
    """A parametrization W -> W / sigma(W) (cap: W / max(sigma, 1), the official code's `lower_bound` for convs that start at ~0),
    sigma = u^T W v by one power iteration on W reshaped to (C_out, -1), run on training forwards (u kept as a buffer)."""
    def __init__(self, weight, cap=False):
        super().__init__()
        self.cap = cap
        self.register_buffer("u", F.normalize(torch.randn(weight.shape[0]), dim=0))
    def forward(self, w):
        m = w.flatten(1)  # (C_out, C_in k k)
        if self.training:
            with torch.no_grad():
                self.u.copy_(F.normalize(m @ F.normalize(m.T @ self.u, dim=0), dim=0))
        u = self.u.clone()  # (a later power iteration must not change what this graph saved)
        v = F.normalize(m.T @ u, dim=0).detach()
        sigma = u @ (m @ v)
        return w / (sigma.clamp_min(1.0) if self.cap else sigma)

def sn(layer, on, cap=False):
    if on:
        parametrize.register_parametrization(layer, "weight", SpectralNorm(layer.weight, cap))
    return layer

class Block(nn.Module):
    """The official ResNet32 block: h = conv1(x + b1[c]), leaky ReLU, h = conv2(h + b2[c]) * g[c], out = leaky ReLU(pool(h + skip(x)));
    b1, b2, g per condition (zeros, zeros, ones), skip = x or a 3 x 3 conv when the width changes; conv2 starts at ~0 (the identity)."""
    def __init__(self, c_in, c_out, n_cond, down, use_sn):
        super().__init__()
        self.down = down
        self.b1, self.b2, self.g = nn.Embedding(n_cond, c_in), nn.Embedding(n_cond, c_out), nn.Embedding(n_cond, c_out)
        nn.init.zeros_(self.b1.weight), nn.init.zeros_(self.b2.weight), nn.init.ones_(self.g.weight)
        self.conv1 = sn(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), use_sn)
        conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        nn.init.normal_(conv2.weight, std=1e-10)  # official: N(0, 1e-10), spectral norm capped at 1
        self.conv2 = sn(conv2, use_sn, cap=True)
        self.skip = sn(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), use_sn) if c_in != c_out else nn.Identity()
    def forward(self, x, c):
        h = F.leaky_relu(self.conv1(x + self.b1(c)[..., None, None]), 0.2)
        h = self.conv2(h + self.b2(c)[..., None, None]) * self.g(c)[..., None, None]
        h = h + self.skip(x)
        return F.leaky_relu(F.avg_pool2d(h, 2) if self.down else h, 0.2)

class EnergyResNet(nn.Module):
    """E_theta(x | c) for images x in [0, 1], (B, C, H, W) -> (B,): conv, 3 stages (w, 2w, 4w) of `blocks` blocks, the first of each
    pooling 2 x 2, then ReLU, the sum over positions and a linear map (official ResNet32Large at w = 128, blocks = 3)."""
    def __init__(self, cfg, shape, n_cond=1):
        super().__init__()
        w, use_sn = cfg.width, cfg.spectral_norm
        self.conv_in = sn(nn.Conv2d(shape[0], w, 3, padding=1, bias=False), use_sn)
        widths = [w * m for m in (1, 2, 4) for _ in range(cfg.blocks)]
        self.blocks = nn.ModuleList(Block(a, b, n_cond, k % cfg.blocks == 0, use_sn) for k, (a, b) in enumerate(zip([w] + widths[:-1], widths)))
        self.out = nn.Linear(4 * w, 1)
    def forward(self, x, c):
        h = F.leaky_relu(self.conv_in(x), 0.2)  # (B, w, H, W)
        for block in self.blocks:
            h = block(h, c)  # (B, 4w, H/8, W/8) at the end
        return self.out(F.relu(h).sum((2, 3))).squeeze(1)

class EnergyMLP(nn.Module):
    """2D data: E_theta(x) = W_out h_n + b, h_k = SiLU(W_k h_{k-1} + b_k) (the condition is ignored: 2D data is unconditional)."""
    def __init__(self, cfg, d=2):
        super().__init__()
        dims = [d] + [cfg.hidden] * cfg.layers
        self.net = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (sn(nn.Linear(a, b), cfg.spectral_norm), nn.SiLU())],
                                 nn.Linear(cfg.hidden, 1))
    def forward(self, x, c=None):
        return self.net(x).squeeze(1)

def make_model(cfg, shape, n_cond=1):
    return EnergyMLP(cfg, shape[0]) if len(shape) == 1 else EnergyResNet(cfg, shape, n_cond)


# ----------------------------------------------------------------------------- objective
# slide "EBM": E_data[grad E(x)] - E_{x' ~ p_theta}[grad E(x')] is the gradient of mean E(x+) - mean E(x-) with x- held fixed
# (no gradient through the sampler); Du & Mordatch (Algorithm 1) add reg (E(x+)^2 + E(x-)^2) to keep the energies near 0.
def contrastive_loss(e_pos, e_neg, reg):
    gap = e_pos.mean() - e_neg.mean()  # the energy gap: -> 0 as the samples become data to the model
    l2 = e_pos.pow(2).mean() + e_neg.pow(2).mean()
    loss = gap + reg * l2
    return loss, {"loss": loss, "gap": gap, "l2": l2, "e_pos": e_pos.mean(), "e_neg": e_neg.mean()}

def adam_std_clip(opt, k):
    """The official code's Adam (custom_adam.py): before each update, every gradient element is clipped to +-(k sqrt(v_hat) + 0.1),
    v_hat = v / (1 - beta2^t) the second-moment estimate of the steps before (bound 0.1 at the first step). A step pre-hook."""
    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if p.grad is None:
                    continue
                if "exp_avg_sq" not in st:
                    p.grad.clamp_(-0.1, 0.1)
                    continue
                bound = k * (st["exp_avg_sq"] / (1 - b2 ** (st["step"].to(p.device) + 1))).sqrt() + 0.1
                torch.minimum(torch.maximum(p.grad, -bound), bound, out=p.grad)
    return opt.register_step_pre_hook(hook)


# ----------------------------------------------------------------------------- sampling
def langevin_params(cfg):  # (step, noise) of x - step grad E + noise z: the slide's alpha/2 and sqrt(alpha), or the decoupled pair
    return (cfg.alpha / 2, math.sqrt(cfg.alpha)) if cfg.sgld == "slide" else (cfg.step_size, cfg.noise)

def reflect(x, lo, hi):  # fold x into [lo, hi] by mirror reflection at the walls
    w = hi - lo
    return lo + (w - ((x - lo) % (2 * w) - w).abs())

def sgld(energy, x, K, step, noise, clip=0.0, box=(0.0, 1.0, False), snapshots=()):
    """SGLD (slide "EBM"; Du & Mordatch, Algorithm 1): K steps x^{k+1} = x^k - step g + noise z, z ~ N(0, I), g = grad_x E(x^k)
    (clipped elementwise to [-clip, clip] when clip > 0), x kept in the box (lo, hi, reflecting): clamped (images, as the official
    code) or reflected at the walls (2D data: then the chain's stationary density is exp(-E) / Z on the box, not one with point
    masses on the walls). The slide's form is step = alpha/2, noise = sqrt(alpha). energy(x) -> (B,). Returns x^K and {k: x^k}
    for the k in snapshots."""
    lo, hi, mirror = box
    x, snaps = x.detach(), {}
    for k in range(K + 1):
        if k in snapshots:
            snaps[k] = x.clone()
        if k == K:
            return x, snaps
        with torch.enable_grad():
            x.requires_grad_(True)
            g = torch.autograd.grad(energy(x).sum(), x)[0]
        g = g.clamp(-clip, clip) if clip > 0 else g
        x = x.detach() - step * g + noise * torch.randn_like(x)
        x = reflect(x, lo, hi) if mirror else x.clamp(lo, hi)

def energy_fn(model, c, run, terms=None):
    """E(x | c) in float32 under the run's autocast; terms: [(weight, condition)] for a composition sum_j w_j E(x | c_j)."""
    def energy(x):
        with run.autocast():
            if terms is None:
                return model(x, c).float()
            return sum(w * model(x, cj).float() for w, cj in terms)
    return energy

def box_of(shape):  # images: [0, 1], clamped; 2D data: [-LIM, LIM]^2, reflecting
    return (0.0, 1.0, False) if len(shape) > 1 else (-LIM, LIM, True)

def uniform_noise(n, shape, device, generator=None):  # chains' start: U[0, 1]^D (images), U[-LIM, LIM]^2 (2D)
    u = torch.rand(n, *shape, generator=generator).to(device) if generator is not None else torch.rand(n, *shape, device=device)
    return u if len(shape) > 1 else (2 * u - 1) * LIM

class ReplayBuffer:
    """Du & Mordatch's sample replay buffer: a ring of `capacity` past SGLD samples with their conditions. Images are kept as uint8
    k = floor(256 x) and read back as (k + u) / 256, u ~ U[0, 1) (the official compress / decompress); 2D points as floats."""
    def __init__(self, capacity, shape, device):
        self.image = len(shape) > 1
        self.x = torch.zeros(capacity, *shape, dtype=torch.uint8 if self.image else torch.float32, device=device)
        self.c = torch.zeros(capacity, dtype=torch.long, device=device)
        self.n, self.next = 0, 0  # filled entries; where the next write goes
    def push(self, x, c):
        x = torch.where(torch.isfinite(x), x, 0.0)  # a diverged chain must not stay in the buffer
        k = min(len(x), len(self.x))
        i = (self.next + torch.arange(k, device=x.device)) % len(self.x)
        self.x[i] = (x[:k] * 256).floor().clamp(0, 255).to(torch.uint8) if self.image else x[:k].float()
        self.c[i] = c[:k]
        self.n, self.next = min(self.n + k, len(self.x)), (self.next + k) % len(self.x)
    def sample(self, k):
        i = torch.randint(self.n, (k,), device=self.x.device)
        x = self.x[i]
        return ((x.float() + torch.rand_like(x, dtype=torch.float)) / 256 if self.image else x.clone()), self.c[i]
    def state_dict(self):
        return {"x": self.x[:self.n].clone(), "c": self.c[:self.n].clone(), "next": self.next}  # (a view would save the whole ring)
    def load_state_dict(self, s):
        n = min(len(s["x"]), len(self.x))
        self.x[:n], self.c[:n] = s["x"][:n].to(self.x), s["c"][:n].to(self.c)
        self.n, self.next = n, int(s["next"]) % len(self.x)

def init_chains(buffer, c_data, shape, reinit):
    """Algorithm 1, line 3: each chain from the buffer with probability 1 - reinit, else uniform noise under the data's condition;
    all from noise until the buffer holds a batch. Returns x^0, its conditions, and the mask of buffer chains."""
    b, device = len(c_data), c_data.device
    x = uniform_noise(b, shape, device)
    if buffer.n < b:
        return x, c_data, torch.zeros(b, dtype=torch.bool, device=device)
    xb, cb = buffer.sample(b)
    keep = torch.rand(b, device=device) >= reinit
    return torch.where(keep.view(-1, *[1] * len(shape)), xb, x), torch.where(keep, cb, c_data), keep

@torch.no_grad()
def draw(model, n, shape, cfg, run, cond=None, terms_of=None, snapshots=()):
    """n fresh chains: eval_K SGLD steps from uniform noise, in batches of eval_batch. cond (n,): their conditions (default 0);
    terms_of(c) -> [(w, c_j)]: a composed energy. Returns samples (CPU), snapshots of the first batch, and the cost."""
    K, (step, noise) = cfg.eval_K or cfg.K, langevin_params(cfg)
    cond, model = torch.zeros(n, dtype=torch.long) if cond is None else cond, model.eval()  # (eval: no power iterations)
    xs, snaps, t0 = [], {}, time.time()
    with parametrize.cached():  # spectral-normalised weights computed once per batch, not per step
        for start in range(0, n, cfg.eval_batch):
            c = cond[start:start + cfg.eval_batch].to(run.device)
            e = energy_fn(model, c, run, terms_of(c) if terms_of else None)
            x, s = sgld(e, uniform_noise(len(c), shape, run.device), K, step, noise, cfg.langevin_clip, box_of(shape),
                        snapshots if start == 0 else ())
            xs.append(x.cpu())
            snaps = snaps or s
    dt = time.time() - t0
    evals = K * (len(terms_of(cond[:1])) if terms_of else 1)
    return torch.cat(xs), snaps, {"sgld_steps": K, "grad_evals": evals, "s_per_sample": dt / max(n, 1), "samples_per_s": n / max(dt, 1e-9)}

def snapshot_steps(K):  # 0, 1, 2, 4, ... < K, and K: the columns of sgld_steps.png (adaptive computation time)
    return sorted({0, K} | {2 ** j for j in range(int(math.log2(K)) + 1) if 2 ** j < K})

def compositions(cfg, n_classes):
    """--condition both: (name, terms_of) for E(x | c), E(x | c) + E(x | light), E(x | c) + E(x | dark), E(x | c) - w E(x | light)."""
    dark, light = n_classes, n_classes + 1
    const = lambda v, c: torch.full_like(c, v)
    return [("c", lambda c: [(1.0, c)]),
            ("c+light", lambda c: [(1.0, c), (1.0, const(light, c))]),
            ("c+dark", lambda c: [(1.0, c), (1.0, const(dark, c))]),
            ("c-light", lambda c: [(1.0, c), (-cfg.neg_weight, const(light, c))])]

def histogram_image(x, bins=200, lim=LIM):  # 2D points -> (1, bins, bins) image of their density, the darkest where most fall
    k = ((x + lim) / (2 * lim) * bins).floor().long()
    k = k[((k >= 0) & (k < bins)).all(1)]
    h = torch.bincount(k[:, 0] * bins + k[:, 1], minlength=bins * bins).view(bins, bins).float().T.flip(0)
    return 1 - (h / h.max().clamp_min(1)).sqrt()[None]

def save_pictures(model, shape, cfg, run, name, n, data_test=None, n_classes=0, buffer=None):
    """<name>.png (n fresh samples), sgld_steps_<step>.png (8 chains at k = 0, 1, 2, 4, ..., eval_K; 2D: histograms), for images
    buffer_<step>.png (n replay-buffer samples, the persistent chains), for 2D data density_<step>.png (test data | exp(-E) / Z |
    samples), for --condition both compose_<step>.png. Returns the samples and cost."""
    suffix, K = name[len("samples"):] if name.startswith("samples") else "", cfg.eval_K or cfg.K
    ks = snapshot_steps(K)
    cond = torch.randint(n_conditions(cfg, n_classes), (n,), generator=torch.Generator().manual_seed(cfg.seed))
    x, snaps, cost = draw(model, n, shape, cfg, run, cond, snapshots=ks)
    if len(shape) > 1:
        common.save_grid(x, run.out / f"{name}.png")
        common.save_grid(torch.stack([snaps[k][:8].cpu() for k in ks], 1).flatten(0, 1), run.out / f"sgld_steps{suffix}.png", nrow=len(ks))
        if buffer is not None and buffer.n:
            common.save_grid(buffer.sample(n)[0], run.out / f"buffer{suffix}.png")
        if cfg.condition == "both":
            compose_grid(model, shape, cfg, run, n_classes, run.out / f"compose{suffix}.png")
    else:
        common.save_grid(histogram_image(x)[None], run.out / f"{name}.png")
        common.save_grid(torch.stack([histogram_image(snaps[k].cpu()) for k in ks]), run.out / f"sgld_steps{suffix}.png", nrow=len(ks))
        panels = [histogram_image(data_test)] if data_test is not None else []
        panels += [density_image(model, cfg, run), histogram_image(x)]
        common.save_grid(torch.stack(panels), run.out / f"density{suffix}.png", nrow=len(panels))
    return x, cost

@torch.no_grad()
def compose_grid(model, shape, cfg, run, n_classes, path, per=8):
    """A row per class, `per` samples of each composition side by side (compositions() order)."""
    c = torch.arange(n_classes).repeat_interleave(per)
    cols = [draw(model, len(c), shape, cfg, run, c, terms_of)[0].view(n_classes, per, *shape) for _, terms_of in compositions(cfg, n_classes)]
    common.save_grid(torch.cat(cols, 1).flatten(0, 1), path, nrow=per * len(cols))


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def grid_energy(model, run, n, lim=LIM):
    """E on the midpoint grid of [-lim, lim]^2 with n points per side: (n, n) float64 (row: x_2 from low to high), cell area."""
    h = 2 * lim / n
    t = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    pts = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).view(-1, 2).float()  # (n^2, 2): x_1 varies fastest
    e = torch.cat([energy_fn(model, None, run)(p.to(run.device)).double().cpu() for p in pts.split(65536)])
    return e.view(n, n), h * h

def log_partition(model, run, n, lim=LIM):  # log Z = log sum_cells exp(-E(cell centre)) area (midpoint rule), float64
    e, area = grid_energy(model, run, n, lim)
    return (torch.logsumexp(-e.flatten(), 0) + math.log(area)).item()

def density_image(model, cfg, run, bins=200):  # exp(-E) / Z on the box as a picture, the darkest where the density is highest
    e, _ = grid_energy(model, run, bins)
    p = (-e - (-e).max()).exp()
    return (1 - p.sqrt()).flip(0)[None].float()

def inception_like_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean p(y|x) of the samples (Salimans et al. 2016, one split), in common.classify's classes."""
    log_p = logits.double().log_softmax(1)
    return math.exp((log_p.exp() * (log_p - log_p.exp().mean(0).log())).sum(1).mean().item())

def mmd2(a, b, bandwidths=(0.05, 0.2, 0.5, 1.0)):
    """Unbiased MMD^2 between point sets a (N, D), b (M, D) in float64, kernel k = sum_h exp(-||a - b||^2 / (2 h^2))."""
    a, b = a.double(), b.double()
    k = lambda u, v: sum(torch.exp(-torch.cdist(u, v) ** 2 / (2 * h * h)) for h in bandwidths)
    kaa, kbb = k(a, a), k(b, b)
    n, m = len(a), len(b)
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2 * k(a, b).mean()).item()

def test_conditions(data, cfg, n, threshold):  # the conditions of the first n test images: their class, else dark / light
    x = data.test[:n].float() / 255
    bright = (x.flatten(1).mean(1) > threshold).long()
    if cfg.condition == "class" or cfg.condition == "both":
        return data.test_labels[:n].clone()
    return bright if cfg.condition == "brightness" else torch.zeros(n, dtype=torch.long)

@torch.no_grad()
def mean_energy(model, x, c, run, batch):
    return torch.cat([energy_fn(model, cb.to(run.device), run)(xb.to(run.device)).double().cpu()
                      for xb, cb in zip(x.split(batch), c.split(batch))]).mean().item()

@torch.no_grad()
def evaluate(model, data, cfg, run, step, buffer=None, n_classes=0, threshold=0.5):
    """2D: the exact test NLL (log Z on the grid), MMD^2 of fresh and buffer samples; images: the energy gap, FD and IS-like of fresh
    and buffer samples; with --condition both, each composition's class accuracy and fraction of light images."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    test = torch.cat(list(common.test_batches(data, cfg, "cpu", 10 ** 6)))  # (N, ...) floats
    n = len(test)
    if data.kind == "image" and cfg.dequantize:
        test = test * (255 / 256) + torch.rand(test.shape, generator=gen) / 256
    c_test = test_conditions(data, cfg, n, threshold) if data.kind == "image" else torch.zeros(n, dtype=torch.long)
    e_test = mean_energy(model, test, c_test, run, cfg.eval_batch)
    extras, m = dict(energy_test=e_test), min(cfg.eval_samples, n // 2 if data.kind == "toy" else n)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        if data.kind == "toy":
            log_z = log_partition(model, run, cfg.z_grid)
            inside = (test.abs() <= LIM).all(1)
            nll = e_test + log_z if inside.all() else math.inf
            extras.update(log_z=log_z, box=f"[-{LIM:g}, {LIM:g}]^2", z_grid=cfg.z_grid, outside_box=int((~inside).sum()))
        if m:
            cond = c_test[:m] if data.kind == "image" else None
            x, _, cost = draw(model, m, data.shape, cfg, run, cond)
            e_samples = mean_energy(model, x, cond if cond is not None else torch.zeros(m, dtype=torch.long), run, cfg.eval_batch)
            extras.update(energy_samples=e_samples, energy_gap=e_test - e_samples, samples=m, **cost)
            xb, cb = [t.cpu() for t in buffer.sample(min(m, buffer.n))] if buffer is not None and buffer.n else (None, None)
            if xb is not None:  # the persistent chains that training contrasts with the data
                extras.update(energy_gap_buffer=e_test - mean_energy(model, xb, cb, run, cfg.eval_batch))
            if data.kind == "toy":
                extras.update(mmd2=mmd2(x, test[:m]), mmd2_floor=mmd2(test[m:2 * m], test[:m]))
                if xb is not None:
                    extras["mmd2_buffer"] = mmd2(xb, test[:len(xb)])
            else:
                _, logits = common.classify(x, data, cfg, run)
                extras.update(fd=common.frechet_distance(x, data, cfg, run), fd_kind=common.fd_label(cfg), is_like=inception_like_score(logits))
                if cfg.condition in ("class", "both"):
                    extras["class_accuracy"] = (logits.argmax(1) == cond).double().mean().item()
                if xb is not None:
                    extras.update(fd_buffer=common.frechet_distance(xb, data, cfg, run, n=len(xb)),
                                  is_like_buffer=inception_like_score(common.classify(xb, data, cfg, run)[1]), buffer_samples=len(xb))
                if cfg.condition == "both":
                    extras.update(compose_metrics(model, data, cfg, run, n_classes, threshold))
    extras["sampler"] = (f"SGLD {cfg.sgld}, " + (f"alpha {cfg.alpha:g}" if cfg.sgld == "slide" else f"step {cfg.step_size:g}, noise {cfg.noise:g}")
                         + (f", grad clip {cfg.langevin_clip:g}" if cfg.langevin_clip else "") + f", {cfg.eval_K or cfg.K} steps from uniform noise")
    if data.kind == "toy":
        return common.eval_record(step, nll, "nats", "exact", n, **extras)
    return common.eval_record(step, None, "bpd", None, n, **extras)

@torch.no_grad()
def compose_metrics(model, data, cfg, run, n_classes, threshold):
    """For each composition (compositions(): c, c+light, c+dark, c-light): the fraction of samples that common.classify labels as the
    conditioned class c, and the fraction light (mean intensity above the training median)."""
    c, out = torch.arange(n_classes).repeat_interleave(cfg.compose_n), {}
    for name, terms_of in compositions(cfg, n_classes):
        x = draw(model, len(c), data.shape, cfg, run, c, terms_of)[0]
        _, logits = common.classify(x, data, cfg, run)
        out[f"compose_{name}_accuracy"] = (logits.argmax(1) == c).double().mean().item()
        out[f"compose_{name}_light"] = (x.flatten(1).mean(1) > threshold).double().mean().item()
    return out


# ----------------------------------------------------------------------------- train
def prepare(x, cfg, data):  # images: the official (k + u) / 256 (x = k / 255 arrives)
    return x * (255 / 256) + torch.rand_like(x) / 256 if data.kind == "image" and cfg.dequantize else x

def data_conditions(x, y, cfg, n_classes, threshold):
    """Each training image's condition: its class, dark (0) / light (1) by mean intensity, or (both) one of the two at random."""
    bright = (x.flatten(1).mean(1) > threshold).long()
    if cfg.condition == "class":
        return y
    if cfg.condition == "brightness":
        return bright
    if cfg.condition == "both":
        return torch.where(torch.rand(len(x), device=x.device) < 0.5, y, n_classes + bright)
    return torch.zeros(len(x), dtype=torch.long, device=x.device)

def load_data(cfg):
    data = common.load_data(cfg)
    resolve(cfg, data.kind, data.train_labels is not None)
    return data

def data_facts(data):  # the number of classes and the brightness threshold (median mean intensity of the training images)
    if data.kind != "image":
        return 0, 0.0
    n_classes = int(data.train_labels.max()) + 1 if data.train_labels is not None else 0
    return n_classes, (data.train.float().flatten(1).mean(1) / 255).median().item()

def train(cfg):
    data = load_data(cfg)
    run = common.setup(cfg, METHOD)
    n_classes, threshold = data_facts(data)
    model = make_model(cfg, data.shape, n_conditions(cfg, n_classes)).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=run.fused)
    if cfg.adam_clip:
        adam_std_clip(opt, cfg.adam_clip)
    update = common.Update(opt, model, run, diverge=cfg.diverge)
    image = data.kind == "image"
    batches = common.Batches(data, cfg, run, labels=image)
    buffer = ReplayBuffer(cfg.buffer_size, data.shape, run.device)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, buffer=buffer)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    sampler = torch.compile(model) if cfg.compile else model
    step_size, noise = langevin_params(cfg)
    run.print(f"{type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters | condition {cfg.condition} "
              f"({n_conditions(cfg, n_classes)}) | SGLD {cfg.sgld}: x - {step_size:g} grad E + {noise:g} z, K {cfg.K}"
              + (f", grad clip {cfg.langevin_clip:g}" if cfg.langevin_clip else "") + f" | buffer {cfg.buffer_size}, reinit {cfg.reinit:g} | reg {cfg.reg:g}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, buffer=buffer,
                               shape=list(data.shape), n_classes=n_classes, threshold=threshold)

    def pictures_and_eval(pictures, evaluation):
        if pictures:
            save_pictures(model, data.shape, cfg, run, f"samples_{step}", cfg.grid, data.test if not image else None, n_classes, buffer)
        if evaluation:
            log.write(evaluate(model, data, cfg, run, step, buffer, n_classes, threshold))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x_pos, y = next(batches) if image else (next(batches), None)
            x_pos = prepare(x_pos, cfg, data)
            c_pos = data_conditions(x_pos, y, cfg, n_classes, threshold)
            x0, c0, _ = init_chains(buffer, c_pos, data.shape, cfg.reinit)
            model.eval()  # (spectral norm: no power iteration inside the sampler)
            with parametrize.cached() if not cfg.compile else nullcontext():  # (compiled: the graph computes the weights itself)
                x_neg, _ = sgld(energy_fn(sampler, c0, run), x0, cfg.K, step_size, noise, cfg.langevin_clip, box_of(data.shape))
            buffer.push(x_neg, c0)
            model.train()
            with run.autocast():
                e = net(torch.cat([x_pos, x_neg]), torch.cat([c_pos, c0])).float()  # (2B,): E(x+), E(x-)
            loss, terms = contrastive_loss(*e.chunk(2), cfg.reg)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and step < cfg.steps:
                pictures_and_eval(common.every(step, cfg.sample_every), common.every(step, cfg.eval_every))
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        pictures_and_eval(True, True)
    return model, buffer


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(common.parse_config(Config, PRESETS, METHOD, argv=argv))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    shape, n_classes, threshold = tuple(ckpt["shape"]), int(ckpt["n_classes"]), float(ckpt["threshold"])
    resolve(cfg, "toy" if len(shape) == 1 else "image", n_classes > 0)
    model = make_model(cfg, shape, n_conditions(cfg, n_classes)).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    buffer = ReplayBuffer(max(cfg.buffer_size, len(ckpt["buffer"]["x"])), shape, run.device)
    buffer.load_state_dict(ckpt["buffer"])
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        test = common.load_data(cfg).test if len(shape) == 1 else None
        x, cost = save_pictures(model, shape, cfg, run, "sample", cfg.sample, test, n_classes, buffer)
        print(f"{cfg.sample} samples in {cfg.sample * cost['s_per_sample']:.3f}s ({cost['samples_per_s']:.2f} samples/s, {cost['grad_evals']} "
              f"energy gradients each: SGLD K {cost['sgld_steps']} from uniform noise) -> {run.out / 'sample.png'}, {run.out / 'sgld_steps.png'}"
              + (f", {run.out / 'density.png'}" if len(shape) == 1 else f", {run.out / 'buffer.png'}"
                 + (f", {run.out / 'compose.png'}" if cfg.condition == "both" else "")))
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, load_data(cfg), cfg, run, ckpt["step"], buffer, n_classes, threshold))

if __name__ == "__main__":
    main()
