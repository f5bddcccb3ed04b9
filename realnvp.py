"""Real NVP and Glow: normalizing flows built from affine coupling layers, with an exact likelihood.

Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", arXiv 1605.08803 (affine coupling,
checkerboard / channel masks, squeeze, multi-scale architecture, batch normalization in the flow).
Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", arXiv 1807.03039 (--flow glow:
ActNorm, LU-parameterised invertible 1x1 convolution, temperature sampling). Logit preprocessing with a
symmetric alpha and MNIST's alpha = 1e-6: Papamakarios et al., "Masked Autoregressive Flow", arXiv 1705.07057.
Slides: "Normalizing Flow (NF)" (change of variables) and "Real-valued Non-volume Preserving Flow (Real NVP)".

A bijection x = z_0 -> z_T = f_T o ... o f_1(z_0) maps the data to a prior p_T(z_T) = N(0, I):

    log p(x) = log p_T(z_T) + sum_t log |det(d f_t(z_{t-1}) / d z_{t-1})|         (slide "Normalizing Flow")
    affine coupling:  z_{t,1:d} = z_{t-1,1:d},
                      z_{t,d+1:K} = z_{t-1,d+1:K} * exp(m_1(z_{t-1,1:d})) + m_2(z_{t-1,1:d})
                      log|det| = sum_k m_1(z_{t-1,1:d})_k       (the Jacobian is triangular, slide "Real NVP")
        Real NVP: m_1 = scale * tanh(h_s) (scale learned per channel); Glow: m_1 = log sigmoid(h_s + 2) and
        m_2 = h_t * sigmoid(h_s + 2), i.e. openai/glow's code z = (z + h_t) * sigmoid(h_s + 2) in the slide's form.
    partitions 1:d / d+1:K: a checkerboard over pixels or a split of the channels, alternating between layers
    squeeze: (C, H, W) -> (4C, H/2, W/2);  multi-scale: after each scale half the channels are factored out to N(0, I)
    batch norm (Real NVP): y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta, log|det| = HW sum_c (log_gamma_c
        - log(var_c + eps) / 2), batch statistics in training, running averages in eval mode (see below)
    ActNorm (Glow): y = (x + b) * exp(log_s), b and log_s set on the first batch so y has zero mean, unit variance
    1x1 conv (Glow): y = W x per pixel, W = P L (U + diag(sign_s exp(log_s))), log|det| = HW sum log_s
    logit: y = logit(alpha + (1 - 2 alpha) x), log|det| = sum log(1 - 2 alpha) - log p - log(1 - p), p = alpha + (1 - 2 alpha) x
    data: x = (k + u) / 256, u ~ U[0, 1)^D (uniform dequantization of 8-bit k);
        -log P(k) <= E_u[-log p(x)] + D log 256, in bits/dim: common.dequantized_bpd (a bound on the discrete NLL)
    sampling: z ~ N(0, T^2 I) (temperature T, Glow), x = f^-1(z)

Choices and deviations. Real NVP: the coupling networks are ResNets (conv 3x3, `--blocks` pre-activation residual
blocks of batch norm, ReLU, conv 3x3, then batch norm, ReLU, conv 3x3) without the paper's weight normalization;
each scale is 3 checkerboard couplings, squeeze, 3 channel couplings, factor out half; the last scale 4 checkerboard
couplings; a batch-norm flow layer follows every coupling. It normalises with the current batch's statistics in
training and with running averages (momentum --bn-momentum, ours) in eval mode and in the inverse; the paper's
variant (sec. 3.7, details in its appendix E) normalises with a running average over recent minibatches in training
too, gradients flowing through the current batch's share only, to be robust with very small minibatches
(tensorflow/models' research/real_nvp code has it as bn_lag, off by default: DEFAULT_BN_LAG = 0). The L2 penalty 5e-5
is Adam's weight_decay on all parameters (that code penalises only its weight-norm magnitudes and coupling scales).
Glow: each level is squeeze, K x (ActNorm, 1x1 conv, affine coupling), then the split; the coupling net is conv 3x3 -
ReLU - conv 1x1 - ReLU - conv 3x3 without the inner ActNorms and the extra edge-padding input channel of Glow's 3x3
convolutions (tfops.conv2d, add_edge_padding); the 1x1 convolution is LU-parameterised (the paper's sec. 3.2 option;
openai/glow's invertible_1x1_conv defaults to the plain W); the factored-out half goes to N(0, I) (Glow's
split2d_prior learns a conditional prior for it from the kept half) and so does the top z_L (Glow's README commands
pass --learntop: a learned mean and log-scale for it, model.prior); inputs are x - 1/2 (Glow's preprocessing,
--no-logit) unless --logit; the optimizer is Adam, without a Polyak average of the weights (Glow's train.py defaults
to --optimizer adamax, beta2 = 1 - 1/(iterations per epoch), and optim.polyak keeps an exponential moving average of
the weights with that decay; the swaps that would evaluate it are commented out in train.py); --batch-size is the
batch of one step (common.py splits it across DDP ranks), while Glow's CIFAR-10 command runs 8 MPI workers of
--n_batch_train 64 each, whose gradients are averaged: an effective batch of 512; linear lr warm-up over --warmup
steps (Glow: over 10 epochs of images, --epochs_warmup). Both: the last layer of every coupling network starts at
zero weights and bias (Glow's "zero initialization", sec. 3.3), without the learned output scale exp(3 logs) of
Glow's tfops.conv2d_zeros. A Real NVP coupling then starts as the identity (m_1 = scale * tanh(0) = 0, m_2 = 0), a
Glow coupling as z_{d+1:K} -> sigmoid(2) z_{d+1:K} = 0.88 z_{d+1:K} (the paper's "identity" holds for s = exp(log s)
of its Table 1, not for the code's sigmoid(h + 2), which this file follows).
2D toys: points are (B, 2, 1, 1) "images", the coupling networks MLPs (1x1 convs), the couplings alternate which
coordinate is fixed; one scale, --depth couplings, no preprocessing.

Presets: `cifar10` is Real NVP's CIFAR-10 setting (8 residual blocks of 64 features in the coupling ResNets, batch
64, Adam lr 1e-3, L2 5e-5, alpha 0.05; slide table: 3.49 bpd) with 2 scales (the paper "downscales only once" for
CIFAR-10, as read here; chrischute/real-nvp's reproduction of sec. 4.1 does the same); with --flow glow it is
Glow's (3 levels, K = 32, 512 channels, lr 1e-3, x - 1/2 inputs; slide table: 3.35 bpd). The numbers of steps, the
Glow preset's batch of 64 (one Glow worker's, see above) and warm-up length are ours; `mnist` (both flows) is ours
too, not run here. `fashion-mnist` is a small Real NVP for 10 minutes on one CPU core (16-feature ResNets of 1 block,
alpha 1e-6 as for MNIST), with --flow glow a small Glow (2 levels, K = 4, 64 channels, with the logit instead of
Glow's x - 1/2: see Results); `toy` (every 2D set): 8 couplings of 2 x 64 ReLU MLPs, 2000 steps of 256 points.

Run:
    python realnvp.py                                    # fashion-mnist, small Real NVP on CPU
    python realnvp.py --flow glow                        # the same data with Glow's layers
    python realnvp.py --dataset moons                    # 2D toy: density_<step>.png (data | exp log p | samples)
    python realnvp.py --dataset cifar10 --flow glow      # Glow's CIFAR-10 configuration on a GPU
    python realnvp.py --sample 64 --temperature 0.7 --ckpt runs/realnvp/fashion-mnist/ckpt.pt
Without --out a run goes to runs/realnvp/<dataset> (folder:PATH data: runs/realnvp/folder-<name of PATH>), with
--flow glow to the same name + "-glow": the two flows' default folders differ.

Results (one CPU core, OMP_NUM_THREADS=1, on a 2-core machine shared with other jobs: s/step varies with their load).
2D toys, `python realnvp.py --dataset D --steps 2000 --batch-size 256` (the toy preset; add `--flow glow` for Glow),
exact test NLL in nats per point on common's toy test set (10000 points); Real NVP 8 couplings (0.04M parameters):
                   Real NVP                 Glow (K = 8)
    8gaussians     3.020   (22.6 ms/step)   2.981   (28.2 ms/step)
    checkerboard   3.772   (14.1 ms/step)   3.760   (27.0 ms/step)
    moons          2.459   (14.1 ms/step)   2.428   (25.3 ms/step)
    circles        3.470   (24.3 ms/step)   3.544   (24.9 ms/step)
    pinwheel       2.505   (22.3 ms/step)   2.478   (24.8 ms/step)
    swissroll      2.802   (22.6 ms/step)   2.818   (25.8 ms/step)
    2spirals       3.099   (24.1 ms/step)   2.974   (24.1 ms/step)
  (ms/step: the median of the logged it/s; each run 35-63 s in all. 8gaussians' true entropy is 2.84 nats,
  checkerboard's log 32 = 3.47.)
Fashion-MNIST (8-bit, uniform dequantization; test bits/dim = a bound on the discrete NLL, first 2000 test images):
    python realnvp.py                   Real NVP, 1500 steps of 64: 3.340 bpd, 0.05M parameters, 0.32-0.35 s/step
                                        (0.6-0.7 s/step while tests ran beside it), 649 s in all
    python realnvp.py --flow glow       Glow (K = 4, logit inputs), 2500 steps of 64: 3.412 bpd, 0.08M parameters,
                                        0.17-0.19 s/step, 447 s (run as `--flow glow --logit --out ...-glow-logit`)
    python realnvp.py --flow glow --no-logit    the same with Glow's x - 1/2 inputs: 4.408 bpd, 457 s
  (most Fashion-MNIST pixels are 0: presumably the small Glow spends its capacity on that boundary in x - 1/2,
  which the logit stretches out; hence the preset's --logit for Glow on fashion-mnist.)
CIFAR-10 presets, seconds per training step on the CPU core (forward, backward, Adam; random 8-bit 3x32x32 data,
batch 64, in-process, not a training run): Real NVP (6.02M parameters, 2 scales) 12.7-14.4 s/step over 3 steps
(run alone); Glow (44.05M parameters) 36-47 s/step over 2 steps: both are GPU configurations. Test bpd on CIFAR-10:
not yet measured.
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "realnvp"
LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    flow: str = common.choice("realnvp", "glow")  # realnvp: couplings + batch norm; glow: actnorm, 1x1 conv, coupling
    scales: int = 2  # L, scales (Real NVP) / levels (Glow); half the variables are factored out after each but the last
    depth: int = 8  # Glow: K flow steps per level; 2D toys: coupling layers (Real NVP images: fixed 3 + 3 per scale, 4 last)
    channels: int = 32  # features of the coupling networks (2D toys: MLP width)
    blocks: int = 2  # Real NVP: residual blocks per coupling ResNet; 2D toys: hidden layers of each MLP
    batchnorm: bool = True  # Real NVP: a batch-normalization flow layer after every coupling
    bn_momentum: float = 0.05  # running averages of the batch-norm layers: r <- (1 - m) r + m batch
    logit: bool = True  # images: model logit(alpha + (1 - 2 alpha) x) (Real NVP); else x - 1/2 (Glow)
    alpha: float = 1e-6  # the logit's alpha (Real NVP CIFAR-10: 0.05; MNIST: 1e-6)
    weight_decay: float = 0.0  # L2 penalty (Adam weight_decay; Real NVP: 5e-5)
    warmup: int = 0  # steps of linear learning-rate warm-up (0 = none)
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    temperature: float = 1.0  # sampling: z ~ N(0, T^2 I) (Glow's reduced-temperature samples use T < 1)
    grid: int = 64  # images: samples in each samples_<step>.png (2D toys: density_<step>.png shows 20000 samples)
    eval_batch: int = 500  # test examples per evaluation batch


PRESETS = {
    "fashion-mnist": dict(flow="realnvp", scales=2, channels=16, blocks=1, alpha=1e-6, steps=1500, batch_size=64, lr=1e-3,
                          log_every=100, ckpt_every=500, eval_n=2000),
    "mnist": dict(flow="realnvp", scales=2, channels=64, blocks=4, alpha=1e-6, steps=100_000, batch_size=64, lr=1e-3,
                  weight_decay=5e-5, log_every=500, ckpt_every=5000, eval_every=20_000),
    "cifar10": dict(flow="realnvp", scales=2, channels=64, blocks=8, alpha=0.05, logit=True, steps=500_000, batch_size=64,
                    lr=1e-3, weight_decay=5e-5, log_every=500, ckpt_every=5000, eval_every=50_000, eval_n=2000),
    "toy": dict(flow="realnvp", depth=8, channels=64, blocks=2, steps=2000, batch_size=256, lr=1e-3, log_every=200,
                ckpt_every=1000),
}
GLOW_PRESETS = {  # --flow glow: parse_config takes these instead of PRESETS (explicit flags still win)
    "fashion-mnist": dict(flow="glow", scales=2, depth=4, channels=64, logit=True, alpha=1e-6, steps=2500, batch_size=64, lr=1e-3,
                          warmup=100, log_every=100, ckpt_every=500, eval_n=2000),
    "mnist": dict(flow="glow", scales=2, depth=16, channels=256, logit=False, steps=100_000, batch_size=64, lr=1e-3,
                  warmup=2000, log_every=500, ckpt_every=5000, eval_every=20_000),
    "cifar10": dict(flow="glow", scales=3, depth=32, channels=512, logit=False, steps=500_000, batch_size=64, lr=1e-3,
                    warmup=5000, log_every=500, ckpt_every=5000, eval_every=50_000, eval_n=2000),
    "toy": dict(flow="glow", depth=8, channels=64, blocks=2, steps=2000, batch_size=256, lr=1e-3, warmup=100, log_every=200,
                ckpt_every=1000),
}


# ----------------------------------------------------------------------------- networks: coupling networks
def zero_conv(c_in, c_out, k):  # weights, bias 0 (Glow's conv2d_zeros adds a learned scale exp(3 logs): not here)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                               nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.f(x)


def coupling_net(kind, c_in, c_out, channels, blocks):
    """h = net(z_{1:d}), (B, c_out, H, W): Real NVP's ResNet, Glow's 3-layer CNN, or an MLP (1x1 convs) for 2D toys."""
    if kind == "realnvp":
        return nn.Sequential(nn.Conv2d(c_in, channels, 3, padding=1), *[ResBlock(channels) for _ in range(blocks)],
                             nn.BatchNorm2d(channels), nn.ReLU(), zero_conv(channels, c_out, 3))
    if kind == "glow":
        return nn.Sequential(nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                             zero_conv(channels, c_out, 3))
    dims = [c_in] + [channels] * blocks
    return nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Conv2d(a, b, 1), nn.ReLU())], zero_conv(dims[-1], c_out, 1))


# ----------------------------------------------------------------------------- networks: flow layers
# Every layer: forward(x) -> (y, log|det dy/dx| (B,)), inverse(y) -> x; all on (B, C, H, W), in fp32.
class Coupling(nn.Module):
    """Slide "Real NVP": y_{d+1:K} = x_{d+1:K} * exp(m_1(x_{1:d})) + m_2(x_{1:d}), y_{1:d} = x_{1:d}.
    mask "checkerboard": x_{1:d} are the pixels with (i + j) % 2 == parity; "channel": the first (parity 0) or
    second half of the channels. style "realnvp": m_1 = scale * tanh(h_s); "glow": m_1 = log sigmoid(h_s + 2)."""

    def __init__(self, C, H, W, mask, parity, style, net_kind, channels, blocks):
        super().__init__()
        self.mask, self.parity, self.style = mask, parity, style
        if mask == "checkerboard":
            ij = torch.arange(H)[:, None] + torch.arange(W)[None, :]
            self.register_buffer("b", ((ij % 2) == parity).float()[None, None])  # (1, 1, H, W): 1 = fixed
            c_in, c_out = C, C
        else:
            c_in, c_out = C // 2, C - C // 2
        self.net = coupling_net(net_kind, c_in, 2 * c_out, channels, blocks)
        self.scale = nn.Parameter(torch.ones(1, c_out, 1, 1)) if style == "realnvp" else None

    def m(self, x_fixed):
        """m_1 (log-scale) and m_2 (shift) of the coupling law, fp32 (the network may run in bf16)."""
        h = self.net(x_fixed).to(x_fixed.dtype)
        h_s, h_t = h[:, 0::2], h[:, 1::2]  # interleaved, so channel c of both comes from neighbouring outputs
        if self.style == "realnvp":
            return self.scale * torch.tanh(h_s), h_t
        log_s = F.logsigmoid(h_s + 2.0)  # Glow: scale = sigmoid(h + 2) in (0, 1), 0.88 at the zero-initialised start
        return log_s, h_t * log_s.exp()

    def split(self, x):
        a, b = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
        return (a, b) if self.parity == 0 else (b, a)

    def join(self, fixed, changed):
        return torch.cat([fixed, changed] if self.parity == 0 else [changed, fixed], 1)

    def forward(self, x):
        if self.mask == "checkerboard":
            m_1, m_2 = self.m(x * self.b)
            m_1, m_2 = m_1 * (1 - self.b), m_2 * (1 - self.b)  # the fixed pixels: identity
            return x * m_1.exp() + m_2, m_1.flatten(1).sum(1)
        fixed, changed = self.split(x)
        m_1, m_2 = self.m(fixed)
        return self.join(fixed, changed * m_1.exp() + m_2), m_1.flatten(1).sum(1)

    def inverse(self, y):
        if self.mask == "checkerboard":
            m_1, m_2 = self.m(y * self.b)
            return (y - m_2 * (1 - self.b)) * torch.exp(-m_1 * (1 - self.b))
        fixed, changed = self.split(y)
        m_1, m_2 = self.m(fixed)
        return self.join(fixed, (changed - m_2) * torch.exp(-m_1))


class BatchNormFlow(nn.Module):
    """Real NVP's batch normalization as a flow layer: y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta,
    log|det| = HW sum_c (log_gamma_c - log(var_c + eps) / 2); batch statistics in training (treated as constants
    in the log-det, as in the paper), running averages in eval mode and in the inverse. (The paper's variant uses
    running averages in training too: see the module docstring.)"""

    def __init__(self, C, momentum, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma, self.beta = nn.Parameter(torch.zeros(1, C, 1, 1)), nn.Parameter(torch.zeros(1, C, 1, 1))
        self.register_buffer("running_mean", torch.zeros(1, C, 1, 1))
        self.register_buffer("running_var", torch.ones(1, C, 1, 1))

    def forward(self, x):
        if self.training:
            mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        log_det = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum() * x.shape[2] * x.shape[3]
        return y, log_det.expand(len(x))

    def inverse(self, y):
        return (y - self.beta) * (-self.log_gamma).exp() * torch.sqrt(self.running_var + self.eps) + self.running_mean


class ActNorm(nn.Module):
    """Glow: y = (x + b) * exp(log_s) per channel, log|det| = HW sum_c log_s_c. Data-dependent initialisation on the
    first training batch (y: zero mean, unit variance per channel, averaged over DDP ranks); the `initialized`
    buffer travels with the checkpoint, so a resumed run does not initialise again."""

    def __init__(self, C):
        super().__init__()
        self.b, self.log_s = nn.Parameter(torch.zeros(1, C, 1, 1)), nn.Parameter(torch.zeros(1, C, 1, 1))
        self.register_buffer("initialized", torch.zeros(()))
        self.ready = False  # a host-side copy of `initialized`: read once per process, not every step

    @torch.no_grad()
    def initialize(self, x):
        if not self.initialized.item():
            moments = torch.stack([x.mean((0, 2, 3)), x.pow(2).mean((0, 2, 3))])  # (2, C)
            if dist.is_initialized():
                dist.all_reduce(moments)
                moments /= dist.get_world_size()
            std = (moments[1] - moments[0] ** 2).clamp_min(0).sqrt()
            self.b.copy_(-moments[0].view_as(self.b))
            self.log_s.copy_(-torch.log(std + 1e-6).view_as(self.log_s))
            self.initialized.fill_(1)
        self.ready = True

    def forward(self, x):
        if self.training and not self.ready:
            self.initialize(x)
        return (x + self.b) * self.log_s.exp(), (self.log_s.sum() * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y):
        return y * (-self.log_s).exp() - self.b


class InvConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution, LU-parameterised: W = P L (U + diag(sign_s * exp(log_s))), P fixed,
    L unit lower triangular, U strictly upper triangular; log|det| = HW sum log_s. Starts at a random rotation.
    Computed in fp32 even under autocast (it is part of the bijection, not a network)."""

    def __init__(self, C):
        super().__init__()
        w = torch.linalg.qr(torch.randn(C, C))[0]
        P, L, U = torch.linalg.lu(w)
        s = U.diagonal()
        self.register_buffer("P", P)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower", torch.tril(torch.ones(C, C), -1))
        self.L, self.U, self.log_s = nn.Parameter(L), nn.Parameter(torch.triu(U, 1)), nn.Parameter(s.abs().log())

    def weight(self):
        eye = torch.eye(len(self.P), device=self.P.device, dtype=self.P.dtype)
        return self.P @ (self.L * self.lower + eye) @ (self.U * self.lower.T + torch.diag(self.sign_s * self.log_s.exp()))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x, self.weight()[:, :, None, None])
        return y, (self.log_s.sum() * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y):
        with torch.autocast(y.device.type, enabled=False):
            return F.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): every 2x2 block of pixels becomes 4 channels; volume preserving."""

    def forward(self, x):
        B, C, H, W = x.shape
        y = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return y.reshape(B, 4 * C, H // 2, W // 2), x.new_zeros(B)

    def inverse(self, y):
        B, C4, H2, W2 = y.shape
        x = y.view(B, C4 // 4, 2, 2, H2, W2).permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return x.reshape(B, C4 // 4, 2 * H2, 2 * W2)


class Logit(nn.Module):
    """Real NVP's preprocessing: y = logit(p), p = alpha + (1 - 2 alpha) x, log|det| = sum log(1 - 2 alpha) - log p - log(1 - p)."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        p = self.alpha + (1 - 2 * self.alpha) * x
        log_det = math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)
        return torch.log(p) - torch.log1p(-p), log_det.flatten(1).sum(1)

    def inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class Shift(nn.Module):
    """Glow's preprocessing: y = x - 1/2 (log|det| = 0)."""

    def forward(self, x):
        return x - 0.5, x.new_zeros(len(x))

    def inverse(self, y):
        return y + 0.5


class Split(nn.Module):
    """Multi-scale: the second half of the channels is factored out to the prior N(0, I); the first half flows on."""


class Flow(nn.Module):
    """The whole bijection x -> (z_1, ..., z_L) and its log-det. Images: preprocessing, then the multi-scale stack;
    2D toys: points (B, 2) are treated as (B, 2, 1, 1) and pass --depth alternating MLP couplings."""

    def __init__(self, cfg, shape):
        super().__init__()
        self.toy, self.shape = len(shape) == 1, tuple(shape)
        C, H, W = (shape[0], 1, 1) if self.toy else shape
        glow, L = cfg.flow == "glow", cfg.scales
        layers, z_shapes = [], []
        if self.toy:
            for t in range(cfg.depth):
                if glow:
                    layers += [ActNorm(C), InvConv1x1(C), Coupling(C, 1, 1, "channel", 0, "glow", "mlp", cfg.channels, cfg.blocks)]
                else:
                    layers += [Coupling(C, 1, 1, "channel", t % 2, "realnvp", "mlp", cfg.channels, cfg.blocks)]
                    layers += [BatchNormFlow(C, cfg.bn_momentum)] if cfg.batchnorm else []
            z_shapes.append((C, 1, 1))
        else:
            need = 2 ** (L if glow else L - 1)
            if H % need or W % need or L < 1:
                common.fail(f"--scales {L} needs image sides divisible by {need} ({cfg.flow}: {'a squeeze per level' if glow else 'L - 1 squeezes'}); "
                            f"got {H}x{W}")
            layers.append(Logit(cfg.alpha) if cfg.logit else Shift())
            for scale in range(L):
                last = scale == L - 1
                if glow:
                    C, H, W = 4 * C, H // 2, W // 2
                    layers.append(Squeeze())
                    for _ in range(cfg.depth):
                        layers += [ActNorm(C), InvConv1x1(C), Coupling(C, H, W, "channel", 0, "glow", "glow", cfg.channels, 0)]
                else:
                    bn = lambda: [BatchNormFlow(C, cfg.bn_momentum)] if cfg.batchnorm else []
                    for t in range(4 if last else 3):  # checkerboard masks, alternating
                        layers += [Coupling(C, H, W, "checkerboard", t % 2, "realnvp", "realnvp", cfg.channels, cfg.blocks)] + bn()
                    if not last:
                        C, H, W = 4 * C, H // 2, W // 2
                        layers.append(Squeeze())
                        for t in range(3):  # channel-wise masks, alternating
                            layers += [Coupling(C, H, W, "channel", t % 2, "realnvp", "realnvp", cfg.channels, cfg.blocks)] + bn()
                if not last:
                    layers.append(Split())
                    z_shapes.append((C - C // 2, H, W))
                    C -= C - C // 2
            z_shapes.append((C, H, W))
        self.layers, self.z_shapes = nn.ModuleList(layers), z_shapes
        self.n_couplings = sum(isinstance(m, Coupling) for m in layers)

    def encode(self, x):
        """x -> [z_1, ..., z_L] (each (B, C_l, H_l, W_l)) and sum_t log|det df_t/dz_{t-1}| (B,), fp32."""
        x = x.view(len(x), -1, 1, 1) if self.toy else x
        zs, log_det = [], x.new_zeros(len(x))
        for layer in self.layers:
            if isinstance(layer, Split):
                x, z = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
                zs.append(z)
            else:
                x, ld = layer(x)
                log_det = log_det + ld
        return zs + [x], log_det

    def decode(self, zs):
        """[z_1, ..., z_L] -> x, the inverse of encode."""
        zs = list(zs)
        x = zs.pop()
        for layer in reversed(self.layers):
            x = torch.cat([x, zs.pop()], 1) if isinstance(layer, Split) else layer.inverse(x)
        return x.view(len(x), -1) if self.toy else x

    def forward(self, x):  # what the training loop calls (so DDP sees one forward)
        return log_prob(self, x)


# ----------------------------------------------------------------------------- objective
# slide "Normalizing Flow": log p(x) = log p_T(z_T) + sum_t log|det(df_t(z_{t-1}) / dz_{t-1})|, p_T = N(0, I)
def log_prob(model, x):
    """log p(x) (B,) in nats of the density of x (images: on [0, 1]^D, preprocessing included) and the log-det (B,)."""
    zs, log_det = model.encode(x)
    log_pz = sum((-0.5 * z.pow(2) - 0.5 * LOG_2PI).flatten(1).sum(1) for z in zs)
    return log_pz + log_det, log_det


def dequantize(x, generator=None):
    """Images k / 255 (Batches' floats) -> x = (k + u) / 256, u ~ U[0, 1): uniform dequantization of the 8-bit k."""
    k = torch.round(x * 255)
    u = torch.rand(k.shape, generator=generator).to(k.device) if generator is not None else torch.rand_like(k)
    return (k + u) / 256


def nll_loss(net, x, dims, toy):
    """The training loss: nats per point (2D toys) or bits/dim of the dequantized data (images, the bound
    -log P(k) <= -log p((k + u)/256) + D log 256 of common.dequantized_bpd); terms include the log-det per dim."""
    log_px, log_det = net(x)
    log_px, log_det = log_px.float(), log_det.float()
    loss = -log_px.mean() if toy else common.dequantized_bpd(log_px.mean(), dims)
    return loss, {"loss": loss, "nats" if toy else "bpd": loss, "log_det_per_dim": log_det.mean() / dims}


def lr_at(cfg, step):  # linear warm-up (Glow), then constant
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, temperature=1.0, device=None):
    """z_l ~ N(0, T^2 I) for every factored-out z_l, then x = f^-1(z) (one inverse pass, model.n_couplings coupling
    networks); images are clamped to [0, 1]. Eval mode: batch norm uses its running averages."""
    device = device or next(model.parameters()).device
    zs = [temperature * torch.randn(n, *s, device=device) for s in model.z_shapes]
    x = model.decode(zs)
    return x if model.toy else x.clamp(0, 1)


def shade(v):
    """Values in [0, 1] (H, W) -> white-to-dark-blue RGB (3, H, W)."""
    return 1 - v[None] * torch.tensor([0.95, 0.75, 0.35], device=v.device)[:, None, None]


def histogram_image(points, bins=200, lim=4.0):
    """2D histogram of points (n, 2) on [-lim, lim]^2 as RGB (3, bins, bins), x_2 upwards."""
    i = ((points.float().cpu() + lim) / (2 * lim) * bins).floor().long()
    keep = ((i >= 0) & (i < bins)).all(1)
    h = torch.bincount(i[keep, 0] * bins + i[keep, 1], minlength=bins * bins).view(bins, bins).float()
    return shade(h.T.flip(0) / h.max().clamp_min(1))


@torch.no_grad()
def density_grid(model, bins=200, lim=4.0):
    """log p on the centres of a bins x bins grid over [-lim, lim]^2 (rows: x_2 from the top), and the cell area."""
    g = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins * 2 * lim - lim
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pts = torch.stack(torch.meshgrid(g, g.flip(0), indexing="xy"), -1).reshape(-1, 2).to(dev, dtype)  # (bins^2, 2)
    log_p = torch.cat([log_prob(model, p)[0] for p in pts.split(20000)])
    return log_p.view(bins, bins), (2 * lim / bins) ** 2


def save_toy_figure(model, data, path, n=20000, temperature=1.0):
    """One PNG: test data | the density exp(log p) on a grid (heat map) | model samples, each on [-4, 4]^2."""
    was = model.training
    model.eval()
    log_p, _ = density_grid(model)
    p = log_p.exp().float().cpu()
    cells = [histogram_image(data.test[:n]), shade(p / p.max()), histogram_image(sample(model, n, temperature))]
    common.save_grid(torch.stack(cells), path, nrow=3)
    model.train(was)


def save_samples(model, cfg, out, step):
    was = model.training
    model.eval()
    common.save_grid(sample(model, cfg.grid, cfg.temperature), out / f"samples_{step}.png")
    model.train(was)


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test NLL in eval mode (batch norm: running averages), fp32. 2D toys: exact, nats per point, on common's toy
    test set (cfg.eval_n points, default 10000). Images: bits/dim of the 8-bit data under uniform dequantization,
    one fixed-seed u per test image: an upper bound on the discrete NLL (-log P(k) <= E_u[-log p((k + u)/256)] + D log 256)."""
    was = model.training
    model.eval()
    if data.kind == "toy":
        log_px = torch.cat([log_prob(model, x.to(run.device))[0].float() for x in data.test.split(cfg.eval_batch)])
        model.train(was)
        return common.eval_record(step, -log_px.mean().item(), "nats", "exact", len(log_px), flow=cfg.flow)
    dims, gen, bpd = math.prod(data.shape), torch.Generator().manual_seed(4321), []
    for x in common.test_batches(data, cfg, run.device, cfg.eval_batch, f"dequantized NLL ({cfg.flow})"):
        with run.autocast():
            log_px = log_prob(model, dequantize(x, gen))[0].float()
        bpd.append(common.dequantized_bpd(log_px, dims))
    model.train(was)
    bpd = torch.cat(bpd)
    return common.eval_record(step, bpd.mean().item(), "bpd", "bound", len(bpd), flow=cfg.flow,
                              dequantization="uniform, 1 sample per image", bits=8)


# ----------------------------------------------------------------------------- train
def train(cfg):
    data = common.load_data(cfg)
    if data.kind not in ("image", "toy"):
        common.fail(f"realnvp.py models images and 2D toy densities; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = Flow(cfg, data.shape).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr_at(cfg, 0), weight_decay=cfg.weight_decay, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    toy, dims = data.kind == "toy", math.prod(data.shape)
    run.print(f"{cfg.flow}: {model.n_couplings} couplings, {len(model.z_shapes)} scale(s), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, D = {dims}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update,
                               shape=list(data.shape))

    def figures(s):
        if toy:
            save_toy_figure(model, data, run.out / f"density_{s}.png", temperature=cfg.temperature)
        else:
            save_samples(model, cfg, run.out, s)

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            x = x if toy else dequantize(x)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            with run.autocast():
                loss, terms = nll_loss(net, x, dims, toy)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                figures(step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        figures(step)
        log.write(evaluate(model, data, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def default_out(dataset):
    """The run folder common.parse_config picks without --out: runs/realnvp/<dataset>, or folder-<name> for folder:PATH."""
    return os.path.join("runs", METHOD, "folder-" + Path(dataset[7:]).name if dataset.startswith("folder:") else dataset)


def check(cfg):
    for flag, v, lo in (("--scales", cfg.scales, 1), ("--depth", cfg.depth, 1), ("--channels", cfg.channels, 1),
                        ("--blocks", cfg.blocks, 0), ("--grid", cfg.grid, 1), ("--eval-batch", cfg.eval_batch, 1),
                        ("--warmup", cfg.warmup, 0)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    if not 0 < cfg.alpha < 0.5:
        common.fail(f"--alpha {cfg.alpha} out of range; accepted: 0 < alpha < 0.5")
    if not cfg.temperature > 0:
        common.fail(f"--temperature {cfg.temperature} out of range; accepted: > 0")
    if not 0 < cfg.bn_momentum <= 1:
        common.fail(f"--bn-momentum {cfg.bn_momentum} out of range; accepted: 0 < m <= 1")
    if cfg.binarize:
        common.fail("--binarize: realnvp.py models 8-bit data (uniform dequantization); accepted: --no-binarize")
    if cfg.dataset in common.TOY_SETS and cfg.blocks < 1:
        common.fail(f"--blocks {cfg.blocks} with a 2D toy: the MLP needs at least 1 hidden layer")
    if cfg.flow == "glow" and cfg.out == default_out(cfg.dataset):  # the default folder: one per flow
        cfg.ckpt = "" if cfg.ckpt == os.path.join(cfg.out, "ckpt.pt") else cfg.ckpt
        cfg.out += "-glow"
        cfg.ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    return cfg


def parse(argv=None):
    """Defaults, PRESETS[dataset], flags; with --flow glow the same from GLOW_PRESETS (also what --help shows)."""
    args = sys.argv[1:] if argv is None else argv
    glow = "--flow=glow" in args or any(a == "--flow" and b == "glow" for a, b in zip(args, args[1:]))
    cfg = common.parse_config(Config, GLOW_PRESETS if glow else PRESETS, METHOD, argv)
    return check(cfg)


def main():
    cfg = parse()
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = Flow(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    data = common.load_data(cfg) if cfg.eval or model.toy else None
    if cfg.sample:
        t = time.time()
        with run.autocast():
            x = sample(model, cfg.sample, cfg.temperature, run.device).float().cpu()
        dt = time.time() - t
        if model.toy:
            common.save_grid(histogram_image(x)[None], run.out / "sample.png")
            save_toy_figure(model, data, run.out / "density.png", temperature=cfg.temperature)
        else:
            common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.0f} samples/s, one inverse pass: {model.n_couplings} "
              f"coupling networks each, temperature {cfg.temperature}) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, data, cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
