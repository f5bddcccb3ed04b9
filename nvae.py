"""NVAE: a deep hierarchical VAE with a bidirectional encoder, residual normal posteriors and spectral regularization.

Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder", arXiv 2007.03898 (official code: NVlabs/NVAE).
Slides: "NVAE" (hierarchical VAEs, long-range correlation, unstable KL; bidirectional encoder; residual normal
distribution; spectral regularization; the NLL table).

The latents come in groups z_1, ..., z_L at several spatial scales (top = coarsest first), with a hierarchical prior
p(z) = prod_l p(z_l | z_<l) and the ELBO of the slide, one KL per group:

    ELBO = E_q[log p(x|z)] - KL(q(z_1|x) || p(z_1)) - sum_{l>=2} E_q(z_<l|x)[KL(q(z_l|x, z_<l) || p(z_l|z_<l))]
    p(z_l^i | z_<l) = N(mu_i, sigma_i)                                   (from the decoder state alone)
    q(z_l^i | z_<l, x) = N(mu_i + dmu_i, sigma_i * dsigma_i)             (residual normal: decoder + encoder features)
    KL(q || p) = 1/2 (dmu_i^2 / sigma_i^2 + dsigma_i^2 - log dsigma_i^2 - 1)   (the slide's closed form, used in the loss)
    p(z_1) = N(0, I), q(z_1|x) = N(dmu, dsigma)
Bidirectional encoder: a bottom-up tower reads x once; the top-down path (the decoder) is shared by inference and
generation: at group l it gives the prior's (mu, sigma) from its state and, combined with the bottom-up features of
that scale, the posterior's (dmu, dsigma). Spectral regularization: L_SR = lambda sum_k s_k, s_k the largest singular
value of conv layer k (its weight reshaped to C_out x C_in k k), estimated by power iteration with persistent vectors;
the official code adds lambda sum_k max |gamma_k| of the batch-norm scales, and so does this file.
Loss = mean_x[-log p(x|z) + beta_t sum_l c_l KL_l] + lambda (L_SR + L_BN), beta_t the KL warm-up (0.0001 -> 1 over
the first 30% of steps) and c_l the KL balancing coefficients (only during warm-up; NVAE's utils.kl_balancer:
c_l proportional to (mean_x KL_l + 0.01) / alpha_l, alpha_l = 4^s / (groups at scale s), s = 0 at the top, the
code's "square" coefficients; normalised to mean 1, no gradient).

Cells as the paper's figure 3 (and the official res_mbconv arch): encoder residual cell BN-Swish-conv3x3-BN-Swish-
conv3x3-SE; generative cell BN-conv1x1 (x6)-BN-Swish-depthwise conv5x5-BN-Swish-conv1x1-BN-SE (x3 in the pre- and
post-processing cells); residual branches scaled by 0.1 (the code); BN momentum 0.05; weight normalisation on every
convolution but the three of the generative cell (as the code); squeeze-and-excitation max(C/16, 4) hidden units. Output: a mixture of
discretized logistics (PixelCNN++; RGB coupled by the linear coefficients, one channel without) over 8-bit pixels;
--binarize: a Bernoulli. Sampling with temperature t: every prior's std (p(z_1) included) times t; before sampling
the batch-norm statistics are readjusted by --readjust-bn forward passes of the generative model in train mode on
samples at the same t (the official evaluate.py: 500 passes of 16), on a copy of the model.

Test NLL: the negative ELBO (analytic KLs; a bound) and log p(x) ~= logsumexp_k log p(x, z_k) / q(z_k|x) - log k
(an estimate), in bits/dim (8-bit data) or nats (binarized), with KL and active units (latent channels with KL > 0.1
nats, the code's criterion) per group.

Differences from the official code: no normalizing flows in q (the slide's "NVAE w/o flow" row); plain BatchNorm
(SyncBatchNorm under DDP); the soft clamp 5 tanh(./5) acts on mu, log sigma of the prior and on dmu, log dsigma
separately, with no +0.01 on sigma, so the residual KL above is exact (the code clamps the sums); the edge bins of the
logistic are x = -1 and x = 1 (the code treats x > 0.99, i.e. the value 254 too, as the top edge); no data-dependent
init (only the code's unused ELU cells have it); lr warm-up and cosine decay per step, not per epoch; Adamax with
eps 1e-3 and weight decay 3e-4 as the code.

Presets. `fashion-mnist` (default): a CPU demo with the complete hierarchy kept shallow (2 latent scales, 14x14 and
7x7, 2 groups each, 16 channels). `mnist`: the official MNIST command (binarized, padded to 32x32, 2 scales, 10
groups with --ada-groups, 20 channels per group, 32 channels, global batch 400 = 2 x 200, 400 epochs, lambda 1e-2;
paper 78.01 nats). `cifar10`: the official CIFAR-10 command without its flow (1 scale of 30 groups at 16x16, 128
channels, global batch 256 = 8 x 32, 400 epochs; paper w/o flow 2.93 bpd).

Run:
    python nvae.py                                           # fashion-mnist demo
    python nvae.py --dataset mnist --data-dir DIR            # the paper's MNIST model (a GPU)
    python nvae.py --eval --ckpt runs/nvae/fashion-mnist/ckpt.pt --eval-k 100
    python nvae.py --sample 64 --temperature 0.7 --ckpt runs/nvae/fashion-mnist/ckpt.pt

Result (`python nvae.py`: fashion-mnist preset, 0.14M parameters, 3000 steps of batch 32, 2 CPU cores, 6.0 it/s,
9 min 52 s wall with the evaluation; first 1000 test images):
    test NLL 3.530 bpd (importance-sampled estimate, k = 100), -ELBO 3.591 bpd (bound);
    KL per group (top first: 7x7, 7x7, 14x14, 14x14) 33.6, 17.3, 38.4, 17.3 nats, active channels 5, 8, 7, 8 of 8
    (no group collapsed). `--seed 1` (run beside another job, one thread): 3.548 / 3.608 bpd, KL 31.8, 31.8, 24.2,
    14.1 nats, active 6, 6, 8, 8. Samples at t = 1 and 0.7 are blurry blobs at this size and budget.
    --sample 64 --temperature 0.7: 1195 images/s (one decoder pass each), after 100 readjustment passes in 1.4 s.
    The mnist / cifar10 presets and the CUDA / bf16 / --compile / DDP paths: not yet measured.
"""
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "nvae"
BN_MOMENTUM = 0.05  # the official code's momentum (PyTorch's default is 0.1)


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    channels: int = 32  # encoder / decoder channels at the input resolution (x2 per downsampling)
    latent_scales: int = 2  # spatial scales that hold latent groups
    groups_per_scale: int = 10  # latent groups at the finest latent scale
    ada_groups: bool = False  # halve the groups at each coarser scale (at least 1)
    latent_per_group: int = 20  # channels of z in one group
    pre_blocks: int = 2  # preprocessing blocks (each ends with a stride-2 cell) between x and the first latent scale
    pre_cells: int = 3  # cells per preprocessing block
    post_blocks: int = 2  # postprocessing blocks (each starts with an upsampling cell)
    post_cells: int = 3  # cells per postprocessing block
    cells_enc: int = 2  # encoder residual cells per group
    cells_dec: int = 2  # generative cells per group
    mixtures: int = 10  # discretized logistic mixture components (8-bit data)
    use_se: bool = True  # squeeze-and-excitation in every cell
    sr_lambda: float = 1e-2  # lambda, the weight of the spectral (and batch-norm scale) regularization
    power_iter: int = 4  # power iterations per step (10 x at the first step)
    kl_anneal: float = 0.3  # share of the steps over which the KL weight rises to 1
    kl_const: float = 1e-4  # share of the steps at the minimum KL weight first
    kl_min: float = 1e-4  # the minimum KL weight
    kl_balance: bool = True  # KL balancing across groups during the warm-up
    warmup: int = 0  # lr warm-up steps (0 = 5 epochs, as the code)
    lr_min: float = 1e-4  # the cosine schedule's final lr
    weight_decay: float = 3e-4  # Adamax weight decay
    grad_clip: float = 0.0  # max gradient norm (0 = none, as the code)
    eval_k: int = 100  # importance samples per test example
    temperature: float = 1.0  # sampling: prior std scaled by this
    readjust_bn: int = 500  # forward passes of the sampler that readjust the batch-norm statistics (0 = keep them)


PRESETS = {
    "fashion-mnist": dict(channels=8, latent_scales=2, groups_per_scale=2, latent_per_group=8, pre_blocks=1, pre_cells=2,
                          post_blocks=1, post_cells=2, cells_enc=1, cells_dec=1, mixtures=5, steps=3000, batch_size=32,
                          warmup=300, log_every=100, ckpt_every=1000, eval_n=1000, eval_k=100, readjust_bn=100),
    "mnist": dict(binarize=True, channels=32, latent_scales=2, groups_per_scale=10, ada_groups=True, latent_per_group=20,
                  pre_blocks=2, pre_cells=3, post_blocks=2, post_cells=3, cells_enc=2, cells_dec=2, batch_size=400,
                  steps=60000, lr=1e-2, log_every=500, ckpt_every=5000, eval_every=10000, eval_k=1000),
    "cifar10": dict(channels=128, latent_scales=1, groups_per_scale=30, latent_per_group=20, pre_blocks=1, pre_cells=2,
                    post_blocks=1, post_cells=2, cells_enc=2, cells_dec=2, batch_size=256, steps=78125, lr=1e-2,
                    log_every=500, ckpt_every=5000, eval_every=10000, eval_n=2000, eval_k=1000),
}


# ----------------------------------------------------------------------------- networks
def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))


def soft_clamp(x):  # 5 tanh(x / 5): a differentiable clamp to [-5, 5] (the official code's soft_clamp5)
    return 5 * torch.tanh(x / 5)


class Conv(nn.Conv2d):
    """A convolution with optional weight normalisation w = exp(g) v / ||v|| (per output channel) and the persistent
    power-iteration vectors u, v (buffers) of its largest singular value."""

    def __init__(self, c_in, c_out, k, stride=1, padding=0, groups=1, bias=True, weight_norm=True):
        super().__init__(c_in, c_out, k, stride, padding, groups=groups, bias=bias)
        self.log_weight_norm = nn.Parameter(self.weight.flatten(1).norm(dim=1).add(1e-2).log()) if weight_norm else None
        rows, cols = c_out, self.weight[0].numel()
        self.register_buffer("sr_u", F.normalize(torch.randn(rows), dim=0, eps=1e-3))
        self.register_buffer("sr_v", F.normalize(torch.randn(cols), dim=0, eps=1e-3))
        self.sr_started = False  # the first estimate runs 10 x the iterations (again after a resume: harmless)

    def normalized_weight(self):
        if self.log_weight_norm is None:
            return self.weight
        norm = self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.log_weight_norm.exp().view(-1, 1, 1, 1) * self.weight / (norm + 1e-5)

    def forward(self, x):
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, 1, self.groups)


class SE(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 mean_hw(x)))."""

    def __init__(self, c):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c, max(c // 16, 4)), nn.ReLU(), nn.Linear(max(c // 16, 4), c), nn.Sigmoid())

    def forward(self, x):
        return x * self.net(x.mean((2, 3)))[:, :, None, None]


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=BN_MOMENTUM)


class FactorizedReduce(nn.Module):
    """The skip path of a stride-2 cell: Swish, then four 1x1 stride-2 convolutions on the input shifted by (0|1, 0|1),
    concatenated (C -> 2C)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        sizes = [c_out // 4] * 3 + [c_out - 3 * (c_out // 4)]
        self.convs = nn.ModuleList([Conv(c_in, s, 1, stride=2) for s in sizes])

    def forward(self, x):
        x = F.silu(x)
        return torch.cat([c(x[:, :, i:, j:]) for c, (i, j) in zip(self.convs, ((0, 0), (1, 1), (0, 1), (1, 0)))], 1)


class Cell(nn.Module):
    """skip(x) + 0.1 * SE(f(x)). kind: "enc" (the encoder residual cell, fig. 3b: BN-Swish-conv3x3 twice) or "gen"
    (the generative cell, fig. 3a: BN-conv1x1 (x ex)-BN-Swish-depthwise conv5x5-BN-Swish-conv1x1-BN); stride 1, 2
    (C -> 2C) or -1 (nearest upsampling, C -> C/2)."""

    def __init__(self, c_in, kind, stride=1, ex=6, use_se=True):
        super().__init__()
        c_out = {1: c_in, 2: 2 * c_in, -1: c_in // 2}[stride]
        self.skip = (nn.Identity() if stride == 1 else FactorizedReduce(c_in, c_out) if stride == 2 else
                     nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), Conv(c_in, c_out, 1)))
        s = abs(stride)
        upsample = [nn.Upsample(scale_factor=2, mode="nearest")] if stride == -1 else []
        if kind == "enc":
            ops = [bn(c_in), nn.SiLU(), *upsample, Conv(c_in, c_out, 3, s, 1), bn(c_out), nn.SiLU(), Conv(c_out, c_out, 3, 1, 1)]
        else:
            h = c_in * ex
            ops = [*upsample, bn(c_in), Conv(c_in, h, 1, bias=False, weight_norm=False), bn(h), nn.SiLU(),
                   Conv(h, h, 5, s, 2, groups=h, bias=False, weight_norm=False), bn(h), nn.SiLU(),
                   Conv(h, c_out, 1, bias=False, weight_norm=False), bn(c_out)]
        self.f = nn.Sequential(*ops, *([SE(c_out)] if use_se else []))

    def forward(self, x):
        return self.skip(x) + 0.1 * self.f(x)


def group_counts(cfg):
    """Groups per latent scale, coarsest (top) first; --ada-groups halves them at each coarser scale."""
    g = [max(1, cfg.groups_per_scale // 2 ** s) if cfg.ada_groups else cfg.groups_per_scale for s in range(cfg.latent_scales)]
    return g[::-1]


class NVAE(nn.Module):
    """Bottom-up encoder tower and top-down decoder; each latent group: a posterior sampler on the encoder side and,
    for all but the first group, a prior sampler on the decoder side."""

    def __init__(self, cfg, shape):
        super().__init__()
        C, H, W = self.shape = tuple(shape)
        self.bernoulli, Z, c0 = cfg.binarize, cfg.latent_per_group, cfg.channels
        down = 2 ** (cfg.pre_blocks + cfg.latent_scales - 1)
        self.pad = (-H) % down // 2  # zeros around x up to a multiple of down (28 -> 32 for the code's MNIST), cropped after
        if (-H) % down % 2 or H != W:
            common.fail(f"nvae.py needs square images that an even padding brings to a multiple of 2^(pre_blocks + "
                        f"latent_scales - 1) = {down}; got {H}x{W}")
        if cfg.pre_blocks != cfg.post_blocks:
            common.fail(f"--pre-blocks {cfg.pre_blocks} and --post-blocks {cfg.post_blocks} must match (down- and upsampling)")
        self.groups = group_counts(cfg)  # coarsest first
        se, mult = cfg.use_se, 1
        self.stem = Conv(C, c0, 3, padding=1)
        self.pre = nn.ModuleList()
        for _ in range(cfg.pre_blocks):
            self.pre.extend([Cell(c0 * mult, "enc", use_se=se) for _ in range(cfg.pre_cells - 1)] + [Cell(c0 * mult, "enc", 2, use_se=se)])
            mult *= 2
        # encoder tower, finest latent scale first: cells, then (but after the very last group) an encoder combiner
        self.enc_tower, combiners = nn.ModuleList(), []
        for s, n in enumerate(self.groups[::-1]):
            for g in range(n):
                self.enc_tower.append(nn.Sequential(*[Cell(c0 * mult, "enc", use_se=se) for _ in range(cfg.cells_enc)]))
                if not (s == cfg.latent_scales - 1 and g == n - 1):
                    combiners.append(Conv(c0 * mult, c0 * mult, 1))  # x_enc + conv1x1(s_dec)
            if s < cfg.latent_scales - 1:
                self.enc_tower.append(Cell(c0 * mult, "enc", 2, use_se=se))
                mult *= 2
        self.enc_combiners = nn.ModuleList(combiners[::-1])  # top-down order: the combiner of group l is [l - 1]
        self.enc0 = nn.Sequential(nn.ELU(), Conv(c0 * mult, c0 * mult, 1), nn.ELU())
        top = (c0 * mult, (H + 2 * self.pad) // down, (W + 2 * self.pad) // down)
        self.h0 = nn.Parameter(torch.rand(top))  # the decoder's learned input (the code's prior_ftr0)
        self.z_shapes = []
        self.q_samplers, self.p_samplers, self.dec_cells, self.dec_combiners = (nn.ModuleList() for _ in range(4))
        for s, n in enumerate(self.groups):
            side = top[1] * 2 ** s
            for g in range(n):
                self.z_shapes.append((Z, side, side))
                self.q_samplers.append(Conv(c0 * mult, 2 * Z, 3, padding=1))  # (dmu, log dsigma)
                if s or g:  # p(z_1) = N(0, I)
                    self.p_samplers.append(nn.Sequential(nn.ELU(), Conv(c0 * mult, 2 * Z, 1)))  # (mu, log sigma)
                    self.dec_cells.append(nn.Sequential(*[Cell(c0 * mult, "gen", use_se=se) for _ in range(cfg.cells_dec)]))
                self.dec_combiners.append(Conv(c0 * mult + Z, c0 * mult, 1))  # conv1x1([s, z])
            if s < cfg.latent_scales - 1:
                self.dec_cells.append(Cell(c0 * mult, "gen", -1, use_se=se))
                mult //= 2
        self.post = nn.ModuleList()
        for _ in range(cfg.post_blocks):
            self.post.extend([Cell(c0 * mult, "gen", -1, ex=3, use_se=se)] + [Cell(c0 * mult // 2, "gen", ex=3, use_se=se)
                                                                               for _ in range(cfg.post_cells - 1)])
            mult //= 2
        self.M = cfg.mixtures
        n_out = C if self.bernoulli else (3 * self.M if C == 1 else 10 * self.M)
        self.out = nn.Sequential(nn.ELU(), Conv(c0 * mult, n_out, 3, padding=1))

    def encode(self, x):
        """The bottom-up pass: the features each group's posterior reads, top group first."""
        h = self.stem(2 * F.pad(x, (self.pad,) * 4) - 1)
        for cell in self.pre:
            h = cell(h)
        feats = []
        for m in self.enc_tower:
            if isinstance(m, Cell):  # a stride-2 cell between scales
                h = m(h)
                continue
            h = m(h)
            feats.append(h)
        feats[-1] = self.enc0(feats[-1])  # the top group reads the end of the tower through enc0
        return feats[::-1]

    def forward(self, x, beta=None, alpha=None, balance=False, cfg=None):  # with beta: the loss, so that DDP sees one forward
        return self.infer(x) if beta is None else nvae_loss(self, x, beta, alpha, balance, cfg)

    def infer(self, x):
        """z ~ q(z|x) -> (likelihood parameters, per group: KL (B,), log q(z_l|.) (B,), log p(z_l|.) (B,), KL per channel (Z,))."""
        feats = self.encode(x)
        s, kls, log_qs, log_ps, kl_ch = self.h0.expand(len(x), -1, -1, -1), [], [], [], []
        p_i = c_i = 0
        for l in range(len(self.z_shapes)):
            if l == 0:  # p(z_1) = N(0, I)
                mu_p = log_sig_p = torch.zeros(len(x), *self.z_shapes[0], device=x.device)
            else:
                if isinstance(self.dec_cells[c_i], Cell):  # an upsampling cell between scales
                    s, c_i = self.dec_cells[c_i](s), c_i + 1
                s, c_i = self.dec_cells[c_i](s), c_i + 1
                mu_p, log_sig_p = self.p_samplers[p_i](s).chunk(2, 1)  # prior: the decoder state alone
                mu_p, log_sig_p, p_i = soft_clamp(mu_p), soft_clamp(log_sig_p), p_i + 1
            ftr = feats[l] if l == 0 else feats[l] + self.enc_combiners[l - 1](s)  # posterior: encoder + decoder
            d_mu, log_d_sig = (soft_clamp(v) for v in self.q_samplers[l](ftr).chunk(2, 1))
            mu_q, log_sig_q = mu_p + d_mu, log_sig_p + log_d_sig
            z = mu_q + log_sig_q.exp() * torch.randn_like(mu_q)  # reparameterization
            kl = residual_normal_kl(up(d_mu), up(log_d_sig), up(log_sig_p))  # (B, Z, h, w)
            kls.append(kl.flatten(1).sum(1))
            kl_ch.append(kl.sum((2, 3)).mean(0))
            log_qs.append(log_normal(up(z), up(mu_q), up(log_sig_q)))
            log_ps.append(log_normal(up(z), up(mu_p), up(log_sig_p)))
            s = self.dec_combiners[l](torch.cat([s, z.to(s.dtype)], 1))
        return self.decode_tail(s), kls, log_qs, log_ps, kl_ch

    def decode_tail(self, s):
        for cell in self.post:
            s = cell(s)
        out = up(self.out(s))
        return out[:, :, self.pad: out.shape[2] - self.pad, self.pad: out.shape[3] - self.pad] if self.pad else out

    def log_px_z(self, x, out):
        """log p(x|z) summed over the (unpadded) image, (B,)."""
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        return disc_mix_logistic_log_prob(2 * x - 1, out, self.M).flatten(1).sum(1)

    def mean_image(self, out):
        """The decoder's mean in [0, 1]: Bernoulli probabilities, or the mixture of the logistic locations (RGB coupled)."""
        if self.bernoulli:
            return torch.sigmoid(out)
        C, M = self.shape[0], self.M
        pi = torch.softmax(out[:, :M], 1)  # (B, M, H, W)
        p = out[:, M:].reshape(len(out), C, -1, *out.shape[2:])  # (B, C, 2M or 3M, H, W)
        means, coeffs = p[:, :, :M], torch.tanh(p[:, :, 2 * M:3 * M]) if C == 3 else None
        m = (means * pi[:, None]).sum(2).clamp(-1, 1)  # (B, C, H, W)
        if C == 3:
            c = (coeffs * pi[:, None]).sum(2)
            m1 = (m[:, 1] + c[:, 0] * m[:, 0]).clamp(-1, 1)
            m = torch.stack([m[:, 0], m1, (m[:, 2] + c[:, 1] * m[:, 0] + c[:, 2] * m1).clamp(-1, 1)], 1)
        return (m + 1) / 2


# ----------------------------------------------------------------------------- objective
# slide "NVAE", residual normal distribution: KL(N(mu + dmu, sigma dsigma) || N(mu, sigma))
#   = 1/2 (dmu^2 / sigma^2 + dsigma^2 - log dsigma^2 - 1), per variable
def residual_normal_kl(d_mu, log_d_sig, log_sig_p):
    return 0.5 * (d_mu.pow(2) * torch.exp(-2 * log_sig_p) + torch.exp(2 * log_d_sig) - 2 * log_d_sig - 1)


def log_normal(z, mu, log_sig):  # log N(z; mu, sigma^2) summed over a group, (B,)
    return (-0.5 * ((z - mu) * torch.exp(-log_sig)).pow(2) - log_sig - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def disc_mix_logistic_log_prob(x, out, M):
    """log P(x) (B, H, W) of 8-bit x in [-1, 1] under a mixture of M logistics discretized into the 256 bins (edges to
    -inf / +inf at x = -1 / 1); RGB: the means of G and B shift linearly with the sub-pixels before them (PixelCNN++)."""
    B, C, H, W = x.shape
    logit_pi = out[:, :M]  # (B, M, H, W)
    p = out[:, M:].reshape(B, C, -1, H, W)
    means, log_s = p[:, :, :M], p[:, :, M:2 * M].clamp(min=-7.0)  # (B, C, M, H, W)
    xe = x[:, :, None]  # (B, C, 1, H, W)
    if C == 3:
        c = torch.tanh(p[:, :, 2 * M:3 * M])
        means = torch.stack([means[:, 0], means[:, 1] + c[:, 0] * xe[:, 0],
                             means[:, 2] + c[:, 1] * xe[:, 0] + c[:, 2] * xe[:, 1]], 1)
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (xe - means + 1 / 255), inv_s * (xe - means - 1 / 255)
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    log_p = torch.where(xe < -0.999, F.logsigmoid(plus), torch.where(xe > 0.999, F.logsigmoid(-minus), log_mid))
    return torch.logsumexp(log_p.sum(1) + F.log_softmax(logit_pi, 1), 1)  # sub-pixels, then the mixture


def kl_weight(step, cfg):
    """KL warm-up (the code's kl_coeff): beta = max(min((step - const) / anneal, 1), kl_min), in steps."""
    return max(min((step - cfg.kl_const * cfg.steps) / max(cfg.kl_anneal * cfg.steps, 1), 1.0), cfg.kl_min)


def balance_alpha(groups):
    """alpha_l of NVAE's kl_balancer_coeff("square"): (2^s)^2 / groups at scale s (s = 0 the top), divided by its minimum."""
    a = torch.cat([torch.full((n,), 4.0 ** s / n) for s, n in enumerate(groups)])
    return a / a.min()


# slide "NVAE": the ELBO with one KL per group; the loss weighs them by beta (warm-up) and c_l (balancing)
def nvae_loss(model, x, beta, alpha, balance, cfg):
    out, kls, _, _, _ = model.infer(x)
    recon = -model.log_px_z(x, out)  # (B,)
    kl_all = torch.stack(kls, 1)  # (B, L)
    if balance:  # during the warm-up: c_l ~ (mean |KL_l| + 0.01) / alpha_l, normalised to mean 1, no gradient
        c = (kl_all.abs().mean(0) + 0.01) / alpha
        c = (c / c.mean()).detach()
    else:
        c = torch.ones_like(alpha)
    sr, bn_reg = spectral_norm_sum(model, cfg.power_iter), bn_scale_sum(model)
    loss = (recon + beta * (kl_all * c).sum(1)).mean() + cfg.sr_lambda * (sr + bn_reg)
    nelbo = recon.mean() + kl_all.sum(1).mean()
    terms = {"loss": loss, "nelbo": nelbo, "recon": recon.mean(), "kl": kl_all.sum(1).mean(), "beta": beta, "sr": sr}
    if not model.bernoulli:
        terms["bpd"] = common.bits_per_dim(nelbo, math.prod(model.shape))
    return loss, terms


# slide "NVAE", spectral regularization: sum_k s_k, s_k = u^T W_k v after power iteration on the persistent u, v
def spectral_norm_sum(model, n_iter):
    total = 0
    for m in model.modules():
        if isinstance(m, Conv):
            W = m.normalized_weight().flatten(1)  # (C_out, C_in k k)
            with torch.no_grad():
                Wd = up(W.detach()).to(m.sr_u.dtype)
                for _ in range(n_iter if m.sr_started else 10 * n_iter):
                    m.sr_v.copy_(F.normalize(m.sr_u @ Wd, dim=0, eps=1e-3))
                    m.sr_u.copy_(F.normalize(Wd @ m.sr_v, dim=0, eps=1e-3))
                m.sr_started = True
            total = total + m.sr_u @ up(W).to(m.sr_u.dtype) @ m.sr_v
    return total


def bn_scale_sum(model):  # the code's batchnorm_loss: sum over BN layers of max |gamma|
    return sum(m.weight.abs().max() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device, t=1.0):
    """Ancestral sampling through the top-down path: z_1 ~ N(0, t^2 I), z_l ~ N(mu_l, (t sigma_l)^2); the decoder's mean."""
    s = model.h0.expand(n, -1, -1, -1).to(device)
    p_i = c_i = 0
    for l, shape in enumerate(model.z_shapes):
        if l == 0:
            z = t * torch.randn(n, *shape, device=device)
        else:
            if isinstance(model.dec_cells[c_i], Cell):
                s, c_i = model.dec_cells[c_i](s), c_i + 1
            s, c_i = model.dec_cells[c_i](s), c_i + 1
            mu, log_sig = (soft_clamp(v) for v in model.p_samplers[p_i](s).chunk(2, 1))
            p_i += 1
            z = mu + t * log_sig.exp() * torch.randn_like(mu)
        s = model.dec_combiners[l](torch.cat([s, z.to(s.dtype)], 1))
    return model.mean_image(model.decode_tail(s))


@torch.no_grad()
def readjusted(model, n_iter, t, batch=16):
    """A copy of the model whose batch-norm statistics come from n_iter sampling passes in train mode at temperature t
    (the paper's readjustment; the official evaluate.py's set_bn); the model itself is left as it is."""
    m = copy.deepcopy(model)
    if n_iter > 0:
        m.train()
        for _ in range(n_iter):
            sample(m, batch, next(m.parameters()).device, t)
    return m.eval()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test -ELBO (analytic KLs; bound) and the importance-sampled log p(x) with cfg.eval_k samples (estimate), KL and
    active units (channels with KL > 0.1 nats) per group; fp32, batch-norm in eval mode."""
    model.eval()
    nelbo, log_px, kl_groups, kl_ch, n = [], [], 0, 0, 0
    for x in common.test_batches(data, cfg, run.device, 100, f"-ELBO and the importance-sampled NLL (k = {cfg.eval_k})"):
        x, log_w = x.contiguous(memory_format=torch.channels_last), []
        for _ in range(cfg.eval_k):
            out, kls, log_qs, log_ps, ch = model.infer(x)
            recon = -model.log_px_z(x, out)
            log_w.append(-recon - sum(log_qs) + sum(log_ps))  # log p(x, z) - log q(z|x), z ~ q
            if len(log_w) == 1:  # the -ELBO with the analytic KLs, from the first sample
                nelbo.append(recon + sum(kls))
                kl_groups = kl_groups + torch.stack(kls, 1).sum(0)
                kl_ch = kl_ch + torch.stack([c * len(x) for c in ch])
        log_px.append(torch.logsumexp(torch.stack(log_w), 0) - math.log(cfg.eval_k))
        n += len(x)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    return common.eval_record(step, to_unit(-torch.cat(log_px).mean().item()), "nats" if cfg.binarize else "bpd", "estimate", n,
                              k=cfg.eval_k, nelbo=to_unit(torch.cat(nelbo).mean().item()), nelbo_kind="bound",
                              kl_per_group=[round(v, 3) for v in (kl_groups / n).tolist()],
                              active_per_group=[int(v) for v in ((kl_ch / n) > 0.1).sum(1).tolist()],
                              latent_per_group=model.z_shapes[0][0], groups=model.groups)


# ----------------------------------------------------------------------------- train
def lr_at(step, cfg, warmup):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr_min at the last step (the code's schedule, per step)."""
    if step < warmup:
        return cfg.lr * step / warmup
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * (step - warmup) / max(cfg.steps - warmup, 1)))


def save_images(model, x, cfg, out, step):
    for t in sorted({cfg.temperature, 0.7}):
        m = readjusted(model, cfg.readjust_bn, t)
        common.save_grid(sample(m, 64, x.device, t), out / f"samples_{step}_t{t:g}.png")
    model.eval()
    with torch.no_grad():
        rec = model.mean_image(model.infer(x)[0])
    model.train()
    common.save_grid(torch.cat([x, rec]), out / f"recon_{step}.png", nrow=len(x))


def check(cfg):
    ints = dict(channels=2, latent_scales=1, groups_per_scale=1, latent_per_group=1, pre_blocks=0, pre_cells=1, post_blocks=0,
                post_cells=1, cells_enc=1, cells_dec=1, mixtures=1, power_iter=1, warmup=0, eval_k=1, readjust_bn=0)
    for k, lo in ints.items():
        if getattr(cfg, k) < lo:
            common.fail(f"--{k.replace('_', '-')} {getattr(cfg, k)} out of range; accepted: integers >= {lo}")
    if not (0 <= cfg.kl_anneal <= 1 and 0 <= cfg.kl_const <= 1 and 0 < cfg.kl_min <= 1):
        common.fail("--kl-anneal, --kl-const in [0, 1] and --kl-min in (0, 1] required")
    if cfg.sr_lambda < 0 or cfg.weight_decay < 0 or not 0 < cfg.lr_min <= cfg.lr or not cfg.temperature >= 0:
        common.fail("--sr-lambda, --weight-decay, --temperature >= 0 and 0 < --lr-min <= --lr required")


def train(cfg):
    check(cfg)
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"nvae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = NVAE(cfg, data.shape).to(run.device, memory_format=torch.channels_last)  # 1.5-3x faster depthwise convs on CPU
    if run.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr, eps=1e-3, weight_decay=cfg.weight_decay)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    alpha = balance_alpha(model.groups).to(run.device)
    warmup = cfg.warmup or 5 * len(data.train) // cfg.batch_size
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    run.print(f"NVAE ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, groups per scale {model.groups} "
              f"(top first), z {[s for s in dict.fromkeys(model.z_shapes)]}, "
              f"{'Bernoulli' if cfg.binarize else f'{cfg.mixtures}-logistic mixture'} output)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, warmup)
            beta = kl_weight(step, cfg)
            x = next(batches).contiguous(memory_format=torch.channels_last)
            with run.autocast():
                loss, terms = net(x, torch.full((), beta, device=run.device), alpha, cfg.kl_balance and beta < 1, cfg)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(model, fixed, cfg, run.out, step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        save_images(model, fixed, cfg, run.out, step)
        log.write(evaluate(model, data, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    check(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = NVAE(cfg, ckpt["shape"]).to(run.device, memory_format=torch.channels_last).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t0 = time.time()
        m = readjusted(model, cfg.readjust_bn, cfg.temperature)
        t1 = time.time()
        x = sample(m, cfg.sample, run.device, cfg.temperature).cpu()
        dt = time.time() - t1
        path = run.out / f"sample_t{cfg.temperature:g}.png"
        common.save_grid(x, path)
        print(f"{cfg.sample} samples at t = {cfg.temperature:g} in {dt:.3f}s ({cfg.sample / dt:.1f} images/s, one decoder pass each; "
              f"batch-norm readjusted by {cfg.readjust_bn} passes in {t1 - t0:.1f}s) -> {path}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
