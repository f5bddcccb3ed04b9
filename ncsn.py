"""NCSN: a noise-conditional score network s_theta(x, sigma), trained by denoising score matching over many noise
levels and sampled by annealed Langevin dynamics.

Song & Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution", arXiv 1907.05600 (NCSN);
Song & Ermon, "Improved Techniques for Training Score-Based Generative Models", arXiv 2006.09011 (NCSNv2);
Hyvarinen, JMLR 2005 (score matching); Vincent, Neural Computation 2011 (denoising score matching); Song, Garg, Shi &
Ermon, "Sliced Score Matching", arXiv 1905.07088. Slides: "Score matching" (the trace form and the denoising form) and
"Noise-conditional Score Network (NCSN)" (Algorithm 1, the CIFAR-10 sample-quality table).

The network outputs the score s_theta(x, sigma) ~ grad_x log q_sigma(x) directly (not -grad_x E_theta(x)), for a
geometric sequence sigma_1 > ... > sigma_L. Objectives (`--objective`), each weighted by lambda(sigma) = sigma^2 and
averaged over a noise level i ~ U{1..L} drawn per example, x~ = x + sigma_i z:
    dsm  (Vincent):   1/2 E ||s_theta(x~, sigma) - grad_x~ log q_sigma(x~|x)||^2,  grad_x~ log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2
    esm  (Hyvarinen): E [tr(grad_x~ s_theta(x~, sigma)) + 1/2 ||s_theta(x~, sigma)||^2], the trace by D backward passes (2D data)
    ssm  (sliced):    E_v [v^T grad_x~ s_theta(x~, sigma) v] + 1/2 ||s_theta||^2, v ~ N(0, I) (SSM-VR: the norm term exact)
Annealed Langevin dynamics (Algorithm 1): for i = 1..L, alpha_i = eps sigma_i^2 / sigma_L^2, T times
    x_t = x_{t-1} + alpha_i / 2 s_theta(x_{t-1}, sigma_i) + sqrt(alpha_i) z_t,
from x_0 ~ U[0, 1]^D (images; 2D data: U[-4, 4]^2); `--denoise` ends with NCSNv2's x + sigma_L^2 s_theta(x, sigma_L), Tweedie's
E[x | x~] for noise sigma_L. Cost: L T (+ 1) network evaluations per sample.
`--arch ncsnv2`: s_theta(x, sigma) = s_theta(x) / sigma (NCSNv2 technique 3), the network itself unconditional.

As the official code (ermongroup/ncsn, ncsnv2): images in [0, 1], uniformly dequantized x = k/256 + u/256 (NCSN; NCSNv2's
CIFAR-10 config does not), fed to the network as 2x - 1, noise and scores in [0, 1] units; the CondRefineNetDilated layout
(4 stages of 2 residual blocks at ngf, 2ngf (down), 2ngf (dilation 2), 2ngf (dilation 4); 4 RefineNet blocks of residual
conv units, multi-resolution fusion and chained residual (average) pooling; ELU), conditional instance normalisation++ with
gamma, alpha ~ N(1, 0.02), beta = 0; Adam (0.9, 0.999), no clipping, no EMA (NCSNv2: 0.999); the DSM loss summed over
pixels, averaged over the batch. Differences: the official sampler takes x + alpha s + sqrt(2 alpha) z with alpha = eps
sigma_i^2 / sigma_L^2, i.e. Algorithm 1 with alpha twice as large. The image presets sample as the code that made the papers'
numbers: eps = 4e-5 at T = 100 (NCSN's code at 2e-5; the paper's text and the default --eps: 2e-5 with Algorithm 1),
1.24e-5 at T = 5 for NCSNv2's cifar10 (its code and paper: 6.2e-6 in the 2 alpha form); `ncsnv2`
reuses NCSN's network with its normalisation made unconditional; 2D data: an MLP (softplus) with a learned embedding of the
level added before every hidden activation (ours).
Metrics (no likelihood: test_nll is null): the held-out DSM loss per noise level (seeded noise), sampling cost (network
evaluations per sample, images/s); images: FD (common.frechet_distance) and the IS-like exp E KL(p(y|x) || p(y)) of
common.classify; 2D data: MMD^2 (unbiased; kernel sum_h exp(-||a - b||^2 / (2 h^2)), h in 0.05, 0.2, 0.5, 1) between
samples and test points, next to the same MMD^2 between two halves of the test set (the floor), and, for 8gaussians (a
known density), the score error E sigma^2 ||s_theta - grad log q_sigma||^2 per level, q_sigma the Gaussian mixture
convolved with N(0, sigma^2 I).
Presets: `fashion-mnist` (CPU) ngf 16 (NCSN's MNIST: 64; 0.52M parameters), 1500 steps x 64, EMA 0.999 (ours), the
paper's sigmas, and T = 20 steps per level with eps = 2e-4 (the code's T 100 at 4e-5: the same eps T) to make sampling
5x cheaper; `toy` (every 2D set) sigma_1 = 5 (about the data's diameter, NCSNv2 technique 1), 20000 steps x 512, the
paper's sigma_L, L, T and its text's eps 2e-5 (the code's 4e-5 gave 1.4-2.2x the MMD^2 on all seven sets); `mnist`,
`cifar10` the paper's (ngf 64 / 128, lr 1e-3, batch 128, 200k steps, T 100, eps 4e-5); with `--arch ncsnv2` the cifar10 preset is NCSNv2's (sigma_1 50, L 232, T 5, denoising, EMA 0.999, lr 1e-4,
300k steps, no dequantization); its other presets add only the denoising step and EMA (NCSNv2's techniques 1, 2, 4 for
sigma_1, L and eps were not applied to them).

Run:
    python ncsn.py                                   # fashion-mnist: DSM, then FD / IS-like of annealed Langevin samples
    python ncsn.py --dataset 8gaussians              # 2D: MMD, the score error against the true score
    python ncsn.py --dataset moons --objective ssm   # sliced score matching (esm: the exact trace)
    python ncsn.py --sample 64 --denoise             # samples.png and anneal.png (a column per noise level)

Results (2 CPU cores, one thread per job, two jobs at once; README has the tables and commands):
    `python ncsn.py` (fashion-mnist, 1500 steps, 1.1 it/s, 36 min wall): held-out DSM sigma = 1 / 0.01: 10.8 / 236.4;
    250 samples at 200 network evaluations each (1.9 s per image): FD 111.2 / 116.6 (sampling seeds 0 / 1) with eps 1e-4,
    89.6 with eps 2e-4 (today's preset), IS-like 3.22 / 3.57; 250 training images: FD 21.3, IS-like 7.30. Today's preset
    alone on 2 threads: 20 min 9 s wall, the same FD 89.55 (1.0 s per image).
    `python ncsn.py --dataset 8gaussians`: MMD^2 0.0163 (test vs test 0.00006), score error 0.0104 (6.1% of a zero score's);
    the other six toys: MMD^2 0.0049-0.0133. mnist / cifar10 presets: not yet measured.
"""
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "ncsn"
LIM = 4.0  # 2D data: Langevin starts uniform on [-LIM, LIM]^2, pictures show that square


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    arch: str = common.choice("ncsn", "ncsnv2")  # ncsnv2: s_theta(x, sigma) = s_theta(x) / sigma, an unconditional network
    objective: str = common.choice("dsm", "ssm", "esm")  # denoising / sliced / explicit (exact trace, 2D only) score matching
    sigma_1: float = 1.0  # the largest noise level
    sigma_L: float = 0.01  # the smallest noise level
    L: int = 10  # noise levels, geometric from sigma_1 to sigma_L
    n_particles: int = 1  # ssm: projections v per example
    ngf: int = 128  # image network width (NCSN: 64 MNIST, 128 CIFAR-10)
    hidden: int = 128  # 2D network: hidden units
    layers: int = 3  # 2D network: hidden layers
    ema: float = 0.0  # EMA decay of the weights used for sampling (0 = none, NCSN; NCSNv2: 0.999)
    dequantize: bool = True  # images: x = k/256 + u/256, u ~ U[0, 1) (NCSN's code; NCSNv2's CIFAR-10: off, x = k/255)
    hflip: bool = False  # random horizontal flips of training images
    grad_clip: float = 0.0  # max gradient norm (0 = none, as the official code)
    eps: float = 2e-5  # Algorithm 1: step size alpha_i = eps sigma_i^2 / sigma_L^2
    T: int = 100  # Algorithm 1: Langevin steps per noise level
    denoise: bool = False  # end with x + sigma_L^2 s_theta(x, sigma_L) (NCSNv2)
    grid: int = 64  # samples in each samples_<step>.png
    eval_samples: int = 1000  # evaluate: samples drawn for FD / IS-like (images) or MMD (2D, at most half the test set)
    eval_batch: int = 500  # images per batch in evaluate and sampling

PRESETS = {
    "fashion-mnist": dict(ngf=16, batch_size=64, lr=1e-3, steps=1500, ema=0.999, eps=2e-4, T=20, log_every=100, ckpt_every=500,
                          eval_n=1000, eval_samples=250, eval_batch=250),
    "toy": dict(sigma_1=5.0, hidden=128, layers=3, batch_size=512, lr=1e-3, steps=20000, log_every=1000, ckpt_every=5000,
                eval_samples=5000, eval_batch=5000, grid=20000),
    "mnist": dict(ngf=64, batch_size=128, lr=1e-3, steps=200_000, eps=4e-5, log_every=1000, ckpt_every=5000, eval_samples=10000),
    "cifar10": dict(ngf=128, hflip=True, batch_size=128, lr=1e-3, steps=200_000, eps=4e-5, log_every=1000, ckpt_every=5000,
                    eval_samples=10000, eval_n=10000),
}  # eps 4e-5 = the official code's 2e-5 (it steps alpha s + sqrt(2 alpha) z), 1.24e-5 = NCSNv2's 6.2e-6
V2 = {"cifar10": dict(sigma_1=50.0, L=232, eps=1.24e-5, T=5, denoise=True, ema=0.999, lr=1e-4, steps=300_000, dequantize=False)}
PRESETS_V2 = {k: {**v, **V2.get(k, dict(denoise=True, ema=0.999))} for k, v in PRESETS.items()}

def resolve(cfg, kind=None):
    for flag, v, lo in (("--L", cfg.L, 2), ("--T", cfg.T, 1), ("--n-particles", cfg.n_particles, 1), ("--ngf", cfg.ngf, 2),
                        ("--hidden", cfg.hidden, 1), ("--layers", cfg.layers, 1), ("--grid", cfg.grid, 1),
                        ("--eval-samples", cfg.eval_samples, 0), ("--eval-batch", cfg.eval_batch, 1)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    if not cfg.sigma_1 > cfg.sigma_L > 0:
        common.fail(f"--sigma-1 {cfg.sigma_1} / --sigma-L {cfg.sigma_L}: accepted sigma_1 > sigma_L > 0")
    if not cfg.eps > 0 or not 0 <= cfg.ema < 1 or cfg.grad_clip < 0:
        common.fail(f"--eps {cfg.eps} / --ema {cfg.ema} / --grad-clip {cfg.grad_clip}: accepted eps > 0, 0 <= ema < 1, grad-clip >= 0")
    if kind and kind not in ("image", "toy"):
        common.fail(f"ncsn.py models images and 2D data; --dataset {cfg.dataset} holds {kind} data")
    if kind == "image" and cfg.objective == "esm":
        common.fail("--objective esm takes one backward pass per dimension (784 for 28x28): use it on 2D data; ssm is its scalable form")
    return cfg

def make_sigmas(cfg):  # sigma_1 > ... > sigma_L, geometric, in float64
    return torch.logspace(math.log10(cfg.sigma_1), math.log10(cfg.sigma_L), cfg.L, dtype=torch.float64)


# ----------------------------------------------------------------------------- networks
class CondNorm(nn.Module):
    """NCSN's conditional instance normalisation++: gamma[i] ((x - mu) / s + alpha[i] (mu - m) / v) + beta[i],
    mu, s the per-channel spatial mean and std, m, v the mean and std of mu over channels; levels = 1: unconditional."""
    def __init__(self, c, levels):
        super().__init__()
        self.c, self.embed = c, nn.Embedding(levels, 3 * c)
        nn.init.normal_(self.embed.weight[:, :2 * c], 1.0, 0.02)  # gamma, alpha ~ N(1, 0.02)
        nn.init.zeros_(self.embed.weight[:, 2 * c:])  # beta = 0
    def forward(self, x, i):
        mu = x.mean((2, 3))  # (B, C)
        means = (mu - mu.mean(1, keepdim=True)) / (mu.var(1, keepdim=True) + 1e-5).sqrt()
        gamma, alpha, beta = self.embed(i).chunk(3, 1)  # (B, C) each
        h = F.instance_norm(x, eps=1e-5) + (alpha * means)[..., None, None]
        return gamma[..., None, None] * h + beta[..., None, None]

def conv3(c_in, c_out, dilation=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)

class ResBlock(nn.Module):
    """norm, ELU, conv, norm, ELU, conv + shortcut. down: the second conv is followed by a 2 x 2 mean pool (NCSN's ConvMeanPool),
    the shortcut a pooled 1 x 1 conv; down with dilation > 1 keeps the resolution (as NCSN's code)."""
    def __init__(self, c_in, c_out, levels, down=False, dilation=1):
        super().__init__()
        mid, self.pool = (c_in if down else c_out), down and dilation == 1
        self.norm1, self.conv1 = CondNorm(c_in, levels), conv3(c_in, mid, dilation)
        self.norm2, self.conv2 = CondNorm(mid, levels), conv3(mid, c_out, dilation)
        self.skip = None if c_in == c_out and not down else nn.Conv2d(c_in, c_out, 1) if self.pool else conv3(c_in, c_out, dilation)
    def forward(self, x, i):
        h = self.conv2(F.elu(self.norm2(self.conv1(F.elu(self.norm1(x, i))), i)))
        s = x if self.skip is None else self.skip(x)
        return F.avg_pool2d(s + h, 2) if self.pool else s + h  # (mean pooling commutes with the sum)

class RCU(nn.Module):  # residual conv units: n blocks of (norm, ELU, conv) x 2 + identity
    def __init__(self, c, levels, n):
        super().__init__()
        self.units = nn.ModuleList(nn.ModuleList([CondNorm(c, levels), conv3(c, c, bias=False), CondNorm(c, levels), conv3(c, c, bias=False)])
                                   for _ in range(n))
    def forward(self, x, i):
        for n1, c1, n2, c2 in self.units:
            x = x + c2(F.elu(n2(c1(F.elu(n1(x, i))), i)))
        return x

class RefineBlock(nn.Module):
    """A RefineNet block (Lin et al. 2017) as NCSN's code: RCUs per input, multi-resolution fusion (norm, conv, bilinear up to
    the finest input, sum), chained residual pooling (ELU, then twice: x += conv(avgpool5(norm(path)))), output RCUs."""
    def __init__(self, c_ins, c, levels, end=False):
        super().__init__()
        self.adapt = nn.ModuleList(RCU(ci, levels, 2) for ci in c_ins)
        self.fuse = nn.ModuleList(nn.ModuleList([CondNorm(ci, levels), conv3(ci, c)]) for ci in c_ins) if len(c_ins) > 1 else None
        self.crp = nn.ModuleList(nn.ModuleList([CondNorm(c, levels), conv3(c, c, bias=False)]) for _ in range(2))
        self.out = RCU(c, levels, 3 if end else 1)
    def forward(self, xs, i, size):
        hs = [a(x, i) for a, x in zip(self.adapt, xs)]
        h = hs[0] if self.fuse is None else sum(F.interpolate(conv(norm(x, i)), size=size, mode="bilinear", align_corners=True)
                                                for (norm, conv), x in zip(self.fuse, hs))
        h = path = F.elu(h)
        for norm, conv in self.crp:
            path = conv(F.avg_pool2d(norm(path, i), 5, stride=1, padding=2))
            h = h + path
        return self.out(h, i)

class ScoreNet(nn.Module):
    """NCSN's CondRefineNetDilated: s_theta(x, sigma_i) for images x in [0, 1] (fed as 2x - 1), (B, C, H, W) -> (B, C, H, W)."""
    def __init__(self, cfg, shape):
        super().__init__()
        c, g, levels = shape[0], cfg.ngf, cfg.L if cfg.arch == "ncsn" else 1
        self.v2 = cfg.arch == "ncsnv2"
        self.register_buffer("sigmas", make_sigmas(cfg).float())
        self.begin = conv3(c, g)
        self.stages = nn.ModuleList(nn.ModuleList([ResBlock(a, b, levels, down=d, dilation=r), ResBlock(b, b, levels, dilation=r)])
                                    for a, b, d, r in ((g, g, False, 1), (g, 2 * g, True, 1), (2 * g, 2 * g, True, 2), (2 * g, 2 * g, True, 4)))
        self.refine = nn.ModuleList([RefineBlock([2 * g], 2 * g, levels), RefineBlock([2 * g, 2 * g], 2 * g, levels),
                                     RefineBlock([2 * g, 2 * g], g, levels), RefineBlock([g, g], g, levels, end=True)])
        self.norm, self.end = CondNorm(g, levels), conv3(g, c)
    def forward(self, x, i):
        j = torch.zeros_like(i) if self.v2 else i  # the normalisation's condition
        h, feats = self.begin(2 * x - 1), []
        for stage in self.stages:
            for block in stage:
                h = block(h, j)
            feats.append(h)  # (B, g, H, W), (B, 2g, H/2, W/2) x 3
        h = self.refine[0]([feats[3]], j, feats[3].shape[2:])
        for block, f in zip(self.refine[1:], feats[2::-1]):
            h = block([f, h], j, f.shape[2:])
        s = self.end(F.elu(self.norm(h, j)))
        return s / self.sigmas[i].view(-1, 1, 1, 1) if self.v2 else s

class ScoreMLP(nn.Module):
    """2D data: s_theta(x, sigma_i) = W_out h_n, h_k = softplus(W_k h_{k-1} + b_k + e_k[i]) (ncsnv2: no e_k, output / sigma_i)."""
    def __init__(self, cfg, d=2):
        super().__init__()
        self.v2 = cfg.arch == "ncsnv2"
        self.register_buffer("sigmas", make_sigmas(cfg).float())
        dims = [d] + [cfg.hidden] * cfg.layers
        self.lin = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.embed = nn.ModuleList(nn.Embedding(1 if self.v2 else cfg.L, cfg.hidden) for _ in range(cfg.layers))
        for e in self.embed:
            nn.init.zeros_(e.weight)
        self.out = nn.Linear(cfg.hidden, d)
    def forward(self, x, i):
        j, h = torch.zeros_like(i) if self.v2 else i, x
        for lin, e in zip(self.lin, self.embed):
            h = F.softplus(lin(h) + e(j))
        s = self.out(h)
        return s / self.sigmas[i][:, None] if self.v2 else s

def make_model(cfg, shape):
    return ScoreMLP(cfg, shape[0]) if len(shape) == 1 else ScoreNet(cfg, shape)


# ----------------------------------------------------------------------------- objectives
def per_example(sigmas, i, like):  # sigma_i broadcast against a batch like `like`
    return sigmas[i].view(-1, *[1] * (like.dim() - 1)).to(like.dtype)

# slide "Score matching": grad_x~ log q_sigma(x~ | x) = grad_x~ log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2
def dsm_target(x_tilde, x, sigma):
    return -(x_tilde - x) / sigma ** 2

# slide "Score matching" (Vincent 2011) with NCSN eq. (6): l(theta; sigma) = 1/2 E ||s_theta(x~, sigma) + (x~ - x) / sigma^2||^2,
# weighted by lambda(sigma) = sigma^2; per example (B,)
def dsm_loss(model, sigmas, x, i, z=None):
    sigma = per_example(sigmas, i, x)
    x_tilde = x + sigma * (torch.randn_like(x) if z is None else z)
    s = model(x_tilde, i).float()
    return 0.5 * (sigma ** 2 * (s - dsm_target(x_tilde, x, sigma)) ** 2).flatten(1).sum(1)

def trace_exact(s, x, create_graph=True):  # tr(grad_x s(x)) per example, one backward pass per dimension (2D data)
    s = s.flatten(1)
    return sum(torch.autograd.grad(s[:, d].sum(), x, create_graph=create_graph)[0].flatten(1)[:, d] for d in range(s.shape[1]))

def trace_sliced(s, x, v, create_graph=True):  # v^T (grad_x s(x)) v per example: E_v = tr(grad_x s) when E[v v^T] = I
    grad = torch.autograd.grad((s * v).sum(), x, create_graph=create_graph)[0]
    return (v * grad).flatten(1).sum(1)

# slide "Score matching" (Hyvarinen 2005): 1/2 E ||s_theta - s_data||^2 = E [tr(grad_x s_theta(x)) + 1/2 ||s_theta(x)||^2] + const,
# applied to x~ ~ q_sigma (the perturbed density is the data of level i), weighted by sigma^2
def esm_loss(model, sigmas, x, i):
    sigma = per_example(sigmas, i, x)
    x_tilde = (x + sigma * torch.randn_like(x)).requires_grad_(True)
    s = model(x_tilde, i).float()
    return (trace_exact(s, x_tilde) + 0.5 * s.flatten(1).pow(2).sum(1)) * sigma.flatten() ** 2

# Sliced score matching (Song et al. 2019, SSM-VR; NCSN's anneal_sliced_score_estimation_vr): the trace by v^T grad s v, v ~ N(0, I)
def ssm_loss(model, sigmas, x, i, n_particles=1):
    sigma = per_example(sigmas, i, x)
    x_tilde = (x + sigma * torch.randn_like(x)).repeat(n_particles, *[1] * (x.dim() - 1)).requires_grad_(True)  # (n B, ...)
    s = model(x_tilde, i.repeat(n_particles)).float()
    per = trace_sliced(s, x_tilde, torch.randn_like(s)) + 0.5 * s.flatten(1).pow(2).sum(1)
    return per.view(n_particles, -1).mean(0) * sigma.flatten() ** 2

def by_quartile(v, i, L, name):  # the mean of v (B,) for the noise levels in each quarter of 1..L (NaN where none: the Logger skips it)
    q = i * 4 // L
    sums, counts = (torch.zeros(4, device=v.device).scatter_add(0, q, w) for w in (v.float(), torch.ones_like(v, dtype=torch.float)))
    return {f"{name}_q{k}": torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)[k] for k in range(4)}

def loss_fn(net, sigmas, x, cfg):
    """cfg.objective at a level i ~ U{1..L} per example: (loss, terms), the terms by level quartile (q0: the largest sigmas)."""
    i = torch.randint(0, len(sigmas), (len(x),), device=x.device)
    per = (dsm_loss(net, sigmas, x, i) if cfg.objective == "dsm" else esm_loss(net, sigmas, x, i) if cfg.objective == "esm"
           else ssm_loss(net, sigmas, x, i, cfg.n_particles))
    return per.mean(), {"loss": per.mean(), **by_quartile(per.detach(), i, len(sigmas), "loss")}


# ----------------------------------------------------------------------------- sampling
def step_sizes(sigmas, eps):  # Algorithm 1, line 3: alpha_i = eps sigma_i^2 / sigma_L^2 (float64)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return eps * sigmas ** 2 / sigmas[-1] ** 2

def init_x(n, shape, device):  # Algorithm 1, line 1: NCSN's uniform noise (images U[0, 1]; 2D data U[-LIM, LIM]^2)
    u = torch.rand(n, *shape, device=device)
    return u if len(shape) > 1 else (2 * u - 1) * LIM

def score_fn(model, run):  # s_theta(x, sigma_i) in float32, under the run's autocast
    def score(x, i):
        with run.autocast():
            return model(x, torch.full((len(x),), i, device=x.device, dtype=torch.long)).float()
    return score

def denoise_step(score, x, sigma_L, L):  # NCSNv2: x + sigma_L^2 s_theta(x, sigma_L), Tweedie's E[x | x~]
    return x + sigma_L ** 2 * score(x, L - 1)

@torch.no_grad()
def annealed_langevin(score, x, sigmas, eps, T, denoise=False, keep=0):
    """Algorithm 1 (annealed Langevin dynamics) from x = x_0, then (denoise) NCSNv2's final step. score(x, i) -> s_theta(x, sigma_i);
    keep > 0: also the first `keep` chains at the end of each level (and after the denoising step)."""
    sigmas, snaps = [float(s) for s in sigmas], []
    for i, alpha in enumerate(step_sizes(sigmas, eps).tolist()):  # Python numbers: no host sync
        for _ in range(T):
            x = x + alpha / 2 * score(x, i) + math.sqrt(alpha) * torch.randn_like(x)  # line 6
        if keep:
            snaps.append(x[:keep].clone())
    if denoise:
        x = denoise_step(score, x, sigmas[-1], len(sigmas))
        snaps += [x[:keep].clone()] if keep else []
    return x, snaps

def draw(model, n, shape, cfg, run, keep=0):
    """n samples in batches of cfg.eval_batch (images clamped to [0, 1] only when shown or scored), the snapshots, and the cost."""
    sigmas, score, xs, snaps = make_sigmas(cfg), score_fn(model.eval(), run), [], []
    t0 = time.time()
    for start in range(0, n, cfg.eval_batch):
        x, s = annealed_langevin(score, init_x(min(cfg.eval_batch, n - start), shape, run.device), sigmas, cfg.eps, cfg.T, cfg.denoise,
                                 keep if start == 0 else 0)
        xs.append(x.cpu())
        snaps = snaps or s
    dt = time.time() - t0
    return torch.cat(xs), snaps, {"nfe": cfg.L * cfg.T + cfg.denoise, "images_per_s": n / dt, "s_per_image": dt / n}

def shown_levels(L, n=10):  # at most n noise levels, evenly spaced, the last included
    return sorted({round(k * (L - 1) / (n - 1)) for k in range(n)}) if L > n else list(range(L))

def histogram_image(x, bins=200, lim=LIM):  # 2D points -> (1, bins, bins) image of their density, the darkest where most fall
    k = ((x + lim) / (2 * lim) * bins).floor().long()
    k = k[((k >= 0) & (k < bins)).all(1)]
    h = torch.bincount(k[:, 0] * bins + k[:, 1], minlength=bins * bins).view(bins, bins).float().T.flip(0)
    return 1 - (h / h.max().clamp_min(1)).sqrt()[None]

def save_pictures(model, shape, cfg, run, name, n):
    """<name>.png (n samples) and anneal_<step>.png (anneal.png for --sample): 8 chains (2D: histograms of the first batch) at the end of each shown level."""
    keep = 8 if len(shape) > 1 else n
    x, snaps, cost = draw(model, n, shape, cfg, run, keep)
    cols, anneal = [snaps[k] for k in shown_levels(cfg.L)] + snaps[cfg.L:], "anneal" + name[7:] if name.startswith("samples_") else "anneal"
    if len(shape) > 1:
        common.save_grid(x, run.out / f"{name}.png")
        grid = torch.stack(cols, 1).flatten(0, 1)  # (8 chains * levels, C, H, W): a row per chain
        common.save_grid(grid, run.out / f"{anneal}.png", nrow=len(cols))
    else:
        common.save_grid(histogram_image(x.cpu())[None], run.out / f"{name}.png")
        common.save_grid(torch.stack([histogram_image(c.cpu()) for c in cols]), run.out / f"{anneal}.png", nrow=len(cols))
    return x, cost


# ----------------------------------------------------------------------------- evaluate
def inception_like_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean p(y|x) of the samples (Salimans et al. 2016, one split), in common.classify's
    classes (not Inception-v3's): 1 <= score <= the number of classes."""
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

GAUSS8 = (4 / 1.414 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1).double(),
          0.5 / 1.414)  # common.toy_sample's 8gaussians: centres, component std

def mixture_score(x, centres, std, sigma):
    """grad_x log q_sigma(x) of an equal-weight mixture of N(c_k, std^2 I) convolved with N(0, sigma^2 I), in float64."""
    v, x = std ** 2 + sigma ** 2, x.double()
    d = centres.to(x.device)[None] - x[:, None]  # (N, K, D)
    w = torch.softmax(-(d ** 2).sum(-1) / (2 * v), 1)  # (N, K) posterior of the component
    return (w[..., None] * d).sum(1) / v

@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """The held-out DSM loss at the shown noise levels (every test example at each, seeded noise), then sample quality."""
    model.eval()
    sigmas, levels, gen = make_sigmas(cfg), shown_levels(cfg.L), torch.Generator().manual_seed(0)
    sums, n = torch.zeros(len(levels), dtype=torch.float64), 0
    for x in common.test_batches(data, cfg, run.device, cfg.eval_batch, "held-out DSM loss"):
        x = prepare(x, cfg, data, gen)
        for j, lev in enumerate(levels):
            i = torch.full((len(x),), lev, device=run.device)
            with run.autocast():
                sums[j] += dsm_loss(model, model.sigmas, x, i, torch.randn(x.shape, generator=gen).to(run.device)).double().sum().cpu()
        n += len(x)
    dsm = (sums / n).tolist()
    extras = dict(dsm=sum(dsm) / len(dsm), dsm_levels=dsm, sigma_levels=[float(sigmas[k]) for k in levels])
    if cfg.eval_samples:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            if data.kind == "toy":
                m = min(cfg.eval_samples, len(data.test) // 2)
                x, _, cost = draw(model, m, data.shape, cfg, run)
                extras.update(mmd2=mmd2(x, data.test[:m]), mmd2_floor=mmd2(data.test[m:2 * m], data.test[:m]), samples=m, **cost)
                if data.name == "8gaussians":
                    extras.update(score_error(model, cfg, run))
            else:
                x, _, cost = draw(model, cfg.eval_samples, data.shape, cfg, run)
                x = x.clamp(0, 1)
                _, logits = common.classify(x, data, cfg, run)
                extras.update(fd=common.frechet_distance(x, data, cfg, run), fd_kind=common.fd_label(cfg),
                              is_like=inception_like_score(logits), samples=len(x), **cost)
        extras["sampler"] = f"annealed Langevin L {cfg.L} x T {cfg.T}, eps {cfg.eps:g}" + (" + denoise" if cfg.denoise else "")
    return common.eval_record(step, None, "nats" if data.kind == "toy" else "bpd", None, n, **extras)

def score_error(model, cfg, run, n=10000):
    """8gaussians: E_{x~ ~ q_sigma} sigma^2 ||s_theta(x~, sigma) - grad log q_sigma(x~)||^2 at the shown levels, and relative to
    E sigma^2 ||grad log q_sigma||^2 (the score of a model that outputs 0)."""
    centres, std = GAUSS8
    gen, errs, rels = torch.Generator().manual_seed(2), [], []
    for lev in shown_levels(cfg.L):
        sigma = float(make_sigmas(cfg)[lev])
        x = centres[torch.randint(8, (n,), generator=gen)] + math.sqrt(std ** 2 + sigma ** 2) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        true = mixture_score(x, centres, std, sigma)
        s = score_fn(model, run)(x.float().to(run.device), lev).double().cpu()
        errs.append(sigma ** 2 * (s - true).pow(2).sum(1).mean().item())
        rels.append(errs[-1] / (sigma ** 2 * true.pow(2).sum(1).mean().item()))
    return dict(score_error=sum(errs) / len(errs), score_error_levels=errs, score_error_rel=sum(rels) / len(rels))


# ----------------------------------------------------------------------------- train
def prepare(x, cfg, data, generator=None):  # images: NCSN's uniform dequantization x = k/256 + u/256 (x = k/255 arrives)
    if data.kind != "image" or not cfg.dequantize:
        return x
    u = torch.rand(x.shape, generator=generator).to(x.device) if generator is not None else torch.rand_like(x)
    return x * (255 / 256) + u / 256

def load_data(cfg):
    data = common.load_data(cfg)
    resolve(cfg, data.kind)
    if data.kind == "image" and any(s % 2 for s in data.shape[1:]):
        common.fail(f"ncsn.py's network halves the image once: sides must be even, got {data.shape[1:]}")
    return data

def train(cfg):
    data = load_data(cfg)
    run = common.setup(cfg, METHOD)
    model = make_model(cfg, data.shape).to(run.device)
    ema = common.EMA(model, cfg.ema) if cfg.ema else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run, hflip=cfg.hflip)
    parts = {"ema": ema} if ema else {}
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, **parts)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    sampler = lambda: ema.model if ema else model
    sig = make_sigmas(cfg)
    run.print(f"{type(model).__name__} ({cfg.arch}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
              f"{cfg.objective} | L {cfg.L} sigmas {sig[0]:.4g} .. {sig[-1]:.4g} | Langevin eps {cfg.eps:g}, T {cfg.T}"
              + (" + denoise" if cfg.denoise else ""))

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, **parts,
                               shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            model.train()
            x = prepare(next(batches), cfg, data)
            with run.autocast():
                loss, terms = loss_fn(net, model.sigmas, x, cfg)
            opt.zero_grad(set_to_none=True)
            update(loss)
            if ema:
                ema.update(model, step + 1)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(sampler(), data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_pictures(sampler(), data.shape, cfg, run, f"samples_{step}", cfg.grid)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        save_pictures(sampler(), data.shape, cfg, run, f"samples_{step}", cfg.grid)
        log.write(evaluate(sampler(), data, cfg, run, step))
    return model, ema


# ----------------------------------------------------------------------------- main
def presets_for(argv):  # --arch ncsnv2 on the command line: NCSNv2's presets
    arch = [a.split("=", 1)[1] if "=" in a else argv[k + 1] if k + 1 < len(argv) else "" for k, a in enumerate(argv)
            if a == "--arch" or a.startswith("--arch=")]
    return PRESETS_V2 if arch and arch[-1] == "ncsnv2" else PRESETS

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(common.parse_config(Config, presets_for(argv), METHOD, argv=argv))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    shape = tuple(ckpt["shape"])
    resolve(cfg, "toy" if len(shape) == 1 else "image")
    model = make_model(cfg, shape).to(run.device).eval()
    common.load_model_state(model, ckpt.get("ema", ckpt["model"]), cfg.ckpt)  # the EMA weights if trained with EMA
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        x, cost = save_pictures(model, shape, cfg, run, "sample", cfg.sample)
        print(f"{cfg.sample} samples in {cfg.sample * cost['s_per_image']:.3f}s ({cost['images_per_s']:.2f} images/s, {cost['nfe']} network "
              f"evaluations each: L {cfg.L} x T {cfg.T}" + (" + 1 denoising" if cfg.denoise else "") + f") -> {run.out / 'sample.png'}, "
              f"{run.out / 'anneal.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, load_data(cfg), cfg, run, ckpt["step"]))

if __name__ == "__main__":
    main()
