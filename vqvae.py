"""Vector-quantized VAE (VQ-VAE), its two-level hierarchy (VQ-VAE-2), and the gated PixelCNN priors that make them
generative.

van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning", arXiv 1711.00937.
Razavi, van den Oord & Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", arXiv 1906.00446.
Gated PixelCNN prior: van den Oord et al., "Conditional Image Generation with PixelCNN Decoders", arXiv 1606.05328.
Slides: "Vector-quantized VAE (VQ-VAE)" and "Vector-quantized VAE + Hierarchical Architecture (VQ-VAE-2)".

An encoder f_theta maps x to a map of D-dimensional vectors; each is replaced by its nearest code of a codebook
{e_1, ..., e_K}; a decoder g_phi maps the codes back to x. The posterior is a point mass on the nearest codes:

    z_q(x) = e_k,  k = argmin_j ||f_theta(x) - e_j||_2                         (nearest-neighbour quantization)
    L = -log p(x | z_q(x)) + ||sg(f_theta(x)) - e||^2 + beta ||f_theta(x) - sg(e)||^2,   beta = 0.25
        (1) reconstruction          (2) VQ loss: moves the codes   (3) commitment: moves the encoder
    straight-through gradient: d L / d f_theta(x) := d L / d z_q  (the decoder's gradient is copied to the encoder)
    EMA codebook (--codebook ema, the paper's appendix A.1), per code i over the n_i encoder outputs it was chosen for:
        N_i <- gamma N_i + (1 - gamma) n_i,  m_i <- gamma m_i + (1 - gamma) sum_j f(x)_{i,j},  e_i = m_i / N_i
    (gamma = 0.99; N Laplace-smoothed as sonnet's VectorQuantizerEMA: N_i <- (N_i + eps) / (n + K eps) n, n = sum_i N_i,
    eps = 1e-5; term (2) leaves the loss). The slide writes the reconstruction term as ||g(e) - x||^2 (--recon mse); the default is a
    discretized logistic likelihood over the 256 values of each sub-pixel (PixelCNN++), so that

    -log p(x) <= -log p(x | z_q(x)) - log p(z_q(x))          (KL(q || p) = -log p(z_q(x)) for a point-mass q)
    with the uniform prior p(z) = K^-D_z:  -log p(x) <= -log p(x | z_q(x)) + D_z log K   (D_z codes per image)
is a bound in bits/dim on the 8-bit data, reported for the learned prior and for the uniform one (the prior the
paper trains the autoencoder under: its KL term is then the constant D_z log K).

VQ-VAE-2 (--levels 2): quantization twice. The bottom encoder reduces x by --down, the top encoder by 2 more;
the top codes z_t are decoded to the bottom resolution and concatenated with the bottom features before the
bottom quantization (the bottom encoder conditioned on the decoded top); the decoder reads the upsampled top codes
and the bottom codes z_b. -log p(x) <= -log p(x | z_t, z_b) - log p(z_t) - log p(z_b | z_t).

Priors (trained after the autoencoder, on the codes of the frozen encoder): a gated PixelCNN over each code map,
p(z) = prod_i p(z_i | z_<i) in raster order, with a vertical stack (the rows above) and a horizontal stack (the
row so far), gated units tanh(W_f * h) . sigmoid(W_g * h), no blind spot; the bottom prior adds, in every layer, a
conditioning map computed from the whole top map; --class-cond adds a class embedding to every gate. Sampling: the
top codes from the top prior, the bottom codes from the bottom prior given them, then the decoder.

Health: codebook perplexity exp(-sum_k p_k log p_k) (p_k the share of encoder outputs on code k; K for uniform
use, 1 for a single code) and dead codes (training: usage EMA below --restart-below uses per batch; test: codes
never chosen), per level. --restart re-seeds dead codes with random encoder outputs of the batch (the random
restarts of Jukebox, Dhariwal et al., arXiv 2005.00341); with --restart the first step seeds the whole codebook
from data.

Details and differences. Encoder / decoder as the paper's CIFAR-10 model (two 4x4 stride-2 convolutions, then
residual blocks ReLU - 3x3 conv - ReLU - 1x1 conv, the same mirrored with transposed convolutions), with
sonnet's VQ-VAE example's 3x3 convolution after the strided ones and its halved width in the first one; inputs
2x - 1. The loss terms are sums over each image (nats, squared norms over the whole code map), averaged over the
batch, as the paper writes L for one x. EMA start (not in the paper): N_i = 1 and m_i = the initial code, so a
code never chosen stays where it is. The codebook starts uniform with variance 1/D (sonnet's initialiser).
VQ-VAE-2's top prior adds multi-head self-attention layers in the paper; here plain gated PixelCNNs, both trained
jointly with one Adam.
Samples show the decoder's mean image (logistic locations), not a draw of p(x|z).

Presets. `fashion-mnist` (default; `mnist` the same): a CPU demo (7 x 7 codes, K = 256, D = 32, narrow networks,
1500 + 1500 steps, the EMA codebook with dead-code restart, without which most codes die: README's table; --levels
2 needs --down 2: 14 x 14 bottom and 7 x 7 top codes). `cifar10`: the paper's CIFAR-10 model (two stride-2 stages
to 8 x 8 codes, every layer 256 units wide, Adam lr 2e-4, batch 128, 250k steps, beta 0.25, the loss-trained
codebook, no restart); K = 512 and D = 64 are the values of sonnet's CIFAR-10 example (the paper's text gives
neither for CIFAR-10); the prior (not trained on CIFAR-10 in the paper) is a 15-layer gated PixelCNN of width 128,
100k steps.

Run:
    python vqvae.py                                         # fashion-mnist: autoencoder, then the prior (--stage all)
    python vqvae.py --levels 2 --down 2 --out runs/vqvae/fashion-2   # VQ-VAE-2
    python vqvae.py --dataset cifar10 --stage ae            # the paper's CIFAR-10 autoencoder on a GPU; --stage prior next
    python vqvae.py --eval --ckpt runs/vqvae/fashion-mnist/ckpt.pt   # the bounds (prior.pt beside it, if there)
    python vqvae.py --sample 64 --ckpt runs/vqvae/fashion-mnist/ckpt.pt

Result (fashion-mnist preset, 2 CPU cores, one seed; test bounds on the first 1000 test images, bits/dim):
    python vqvae.py                                        1500 + 1500 steps, 2 min 45 s wall
        learned prior 3.543 (uniform prior 3.808; -log p(x|z) 3.308 + prior 0.235), MSE 0.0080,
        perplexity 154.9 of 256, 0 dead codes; 31.5 it/s (autoencoder), 13.9 it/s (prior)
    python vqvae.py --levels 2 --down 2 --out runs/vqvae/fashion-mnist-2     1500 + 1500 steps, 12 min 5 s wall
        learned prior 3.676 (uniform prior 5.257; -log p(x|z) 2.757 + priors 0.919), MSE 0.0015,
        perplexity top 206.0, bottom 124.4, 0 dead codes; 9.3 it/s (autoencoder), 2.8 it/s (the two priors)
    Two levels reconstruct far better (5 x the codes) but their bottom prior, 196 codes, is the harder model to
    fit at this budget, so the one-level bound is lower here. --sample 64: 65.8 images/s (49 prior evaluations
    each), 4.6 images/s for two levels (245). The cifar10 preset and the CUDA / bf16 / --compile paths: not yet measured.
"""
import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "vqvae"
PRIOR = "vqvae-prior"  # the method name in a prior checkpoint


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    stage: str = common.choice("all", "ae", "prior")  # all: the autoencoder, then the prior; ae / prior: one of them
    levels: int = 1  # 1: VQ-VAE; 2: VQ-VAE-2 (top and bottom codes)
    down: int = 4  # the bottom codes' downsampling factor (a power of 2; the top codes: 2 x down)
    hidden: int = 256  # encoder / decoder channels
    res_hidden: int = 256  # channels inside a residual block (the paper: every layer 256 wide)
    n_res: int = 2  # residual blocks in each encoder and decoder
    codes: int = 512  # K, codebook size (per level)
    code_dim: int = 64  # D, dimension of a code
    beta: float = 0.25  # commitment weight
    codebook: str = common.choice("loss", "ema")  # loss: the VQ term (2) trains the codes; ema: the paper's EMA update
    decay: float = 0.99  # gamma of the EMA codebook and of the usage EMA that finds dead codes
    restart: bool = False  # re-seed dead codes with random encoder outputs of the batch (the first step seeds all)
    restart_below: float = 1.0  # a code is dead while its usage EMA is below this many encoder outputs per batch
    recon: str = common.choice("logistic", "mse")  # logistic: -log p(x|z), discretized logistic (a bpd bound); mse: ||g(e) - x||^2
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    prior_steps: int = 100_000  # optimizer steps of the prior stage
    prior_lr: float = 3e-4  # learning rate of the prior stage
    prior_channels: int = 128  # gated PixelCNN width
    prior_layers: int = 15  # gated layers (the first 7x7, the others 3x3)
    prior_cond_layers: int = 5  # residual blocks of the bottom prior's conditioning stack (5: it sees a 7x7 top map whole)
    class_cond: bool = False  # condition the priors on the class label (the bound is then of p(x | y))
    prior_ckpt: str = ""  # the prior checkpoint (default: prior.pt beside --ckpt, the autoencoder's)
    temperature: float = 1.0  # sampling: the prior's logits are divided by this


PRESETS = {
    "fashion-mnist": dict(hidden=64, res_hidden=32, codes=256, code_dim=32, codebook="ema", restart=True, steps=1500,
                          batch_size=64, lr=1e-3, prior_steps=1500, prior_lr=1e-3, prior_channels=32, prior_layers=12,
                          log_every=100, ckpt_every=500, eval_n=1000),
    "cifar10": dict(hidden=256, res_hidden=256, codes=512, code_dim=64, steps=250_000, batch_size=128, lr=2e-4,
                    prior_steps=100_000, prior_lr=3e-4, prior_channels=128, prior_layers=15, log_every=500,
                    ckpt_every=5000, eval_every=25000, eval_n=2000),
}
PRESETS["mnist"] = PRESETS["fashion-mnist"]  # (8-bit MNIST: the same CPU demo)


# ----------------------------------------------------------------------------- networks
def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))


class ResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))): the paper's residual block."""

    def __init__(self, c, c_res):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c_res, 3, padding=1), nn.ReLU(), nn.Conv2d(c_res, c, 1))

    def forward(self, x):
        return x + self.net(x)


def encoder(c_in, hidden, res_hidden, n_res, n_down):
    """n_down 4x4 stride-2 convolutions (halved width but the last), a 3x3 convolution, residual blocks, ReLU."""
    layers, c = [], c_in
    for i in range(n_down):
        c_out = hidden if i == n_down - 1 else hidden // 2
        layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.ReLU()]
        c = c_out
    layers += [nn.Conv2d(c, hidden, 3, padding=1), *[ResBlock(hidden, res_hidden) for _ in range(n_res)], nn.ReLU()]
    return nn.Sequential(*layers)


def decoder(c_in, c_out, hidden, res_hidden, n_res, n_up):
    """A 3x3 convolution, residual blocks, ReLU, then n_up 4x4 stride-2 transposed convolutions (the encoder mirrored)."""
    layers, c = [nn.Conv2d(c_in, hidden, 3, padding=1), *[ResBlock(hidden, res_hidden) for _ in range(n_res)], nn.ReLU()], hidden
    for i in range(n_up):
        last = i == n_up - 1
        layers += [nn.ConvTranspose2d(c, c_out if last else hidden // 2, 4, 2, 1)] + ([] if last else [nn.ReLU()])
        c = hidden // 2
    return nn.Sequential(*layers) if n_up else nn.Sequential(*layers, nn.Conv2d(hidden, c_out, 1))


class Quantizer(nn.Module):
    """The codebook {e_1..e_K} of one level: nearest-code lookup; while training, the EMA codebook update (ema), the
    usage EMA that marks dead codes, and their restart. The codes are a Parameter (loss) or a buffer (ema), so a
    skipped non-finite step (common.Update) leaves an EMA codebook as it was."""

    def __init__(self, K, D, ema=False, decay=0.99, restart=False, restart_below=1.0, eps=1e-5):
        super().__init__()
        self.K, self.D, self.ema, self.decay, self.restart, self.restart_below, self.eps = K, D, ema, decay, restart, restart_below, eps
        e = (torch.rand(K, D) * 2 - 1) * math.sqrt(3 / D)  # variance 1/D: sonnet's VarianceScaling(distribution="uniform")
        if ema:
            self.register_buffer("embed", e)
            self.register_buffer("N", torch.ones(K))  # EMA of the counts n_i (start: as if each code had been chosen once)
            self.register_buffer("m", e.clone())  # EMA of the sums of the encoder outputs on each code
        else:
            self.embed = nn.Parameter(e)
        self.register_buffer("usage", torch.zeros(K))  # EMA of n_i, for dead codes (start 0: all dead at step 1)

    def nearest(self, flat):
        """k = argmin_j ||z - e_j||^2 for every row z of flat (M, D), in fp32: ||z||^2 - 2 z.e_j + ||e_j||^2."""
        e = up(self.embed).to(flat.dtype)
        with torch.autocast(flat.device.type, enabled=False):
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)  # (M, K)
        return d.argmin(1)

    def forward(self, z_e):
        """z_e (B, D, H, W) -> z_q (B, D, H, W) (the chosen codes, differentiable in the codebook), codes (B, H, W),
        counts n (K,)."""
        B, D, H, W = z_e.shape
        flat = up(z_e).permute(0, 2, 3, 1).reshape(-1, D).detach()  # (B*H*W, D)
        idx = self.nearest(flat)
        n = torch.bincount(idx, minlength=self.K).to(flat.dtype)
        z_q = F.embedding(idx, self.embed).view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, H, W), the codes before the update
        if self.training:
            self.maintain(flat, idx, n)
        return z_q, idx.view(B, H, W), n

    @torch.no_grad()
    def maintain(self, flat, idx, n):
        sums = torch.zeros_like(self.m if self.ema else self.embed).index_add_(0, idx, flat.to(self.embed.dtype))  # (K, D)
        if dist.is_initialized() and dist.get_world_size() > 1:  # the statistics of the global batch
            dist.all_reduce(n := n.clone())
            dist.all_reduce(sums)
        g = self.decay
        if self.ema:  # appendix A.1: N_i, m_i moving averages, e_i = m_i / N_i (N Laplace-smoothed)
            self.N.mul_(g).add_(n, alpha=1 - g)
            self.m.mul_(g).add_(sums, alpha=1 - g)
            total = self.N.sum()
            smoothed = (self.N + self.eps) / (total + self.K * self.eps) * total
            self.embed.copy_(self.m / smoothed[:, None])
        self.usage.mul_(g).add_(n, alpha=1 - g)
        if self.restart:  # dead codes -> random encoder outputs of this batch (no host sync: a masked copy)
            dead = self.usage < self.restart_below
            new = flat[torch.randint(len(flat), (self.K,), device=flat.device)].to(self.embed.dtype)  # (K, D)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(new, 0)
            self.embed.data.copy_(torch.where(dead[:, None], new, self.embed))
            if self.ema:
                self.m.copy_(torch.where(dead[:, None], new, self.m))
                self.N.copy_(torch.where(dead, 1.0, self.N))
            self.usage.copy_(torch.where(dead, self.restart_below, self.usage))

    def dead(self):  # codes whose usage EMA is below the restart threshold
        return (self.usage < self.restart_below).sum()


class VQVAE(nn.Module):
    """Encoder, one (VQ-VAE) or two (VQ-VAE-2) quantizers, decoder. Levels are listed top first."""

    def __init__(self, cfg, shape):
        super().__init__()
        C, H, W = self.shape = tuple(shape)
        if cfg.levels not in (1, 2):
            common.fail(f"--levels {cfg.levels} unknown; accepted: 1, 2")
        n_down = int(math.log2(cfg.down)) if cfg.down >= 2 else 0
        if 2 ** n_down != cfg.down or H % (cfg.down * cfg.levels) or W % (cfg.down * cfg.levels):  # (levels 2: the top is 2 x down)
            common.fail(f"--down {cfg.down} with --levels {cfg.levels}: needs a power of 2 >= 2 such that {H}x{W} divides by "
                        f"{cfg.down * cfg.levels}" + (" (28 x 28 images with --levels 2: --down 2)" if cfg.levels == 2 else ""))
        self.levels, self.logistic, self.beta, K, D = cfg.levels, cfg.recon == "logistic", cfg.beta, cfg.codes, cfg.code_dim
        hid, rh, nr = cfg.hidden, cfg.res_hidden, cfg.n_res
        q = lambda: Quantizer(K, D, cfg.codebook == "ema", cfg.decay, cfg.restart, cfg.restart_below)
        self.enc_b = encoder(C, hid, rh, nr, n_down)  # x -> (B, hid, H/down, W/down)
        n_out = 2 * C if self.logistic else C  # (logistic mean, log scale) | the mean, per sub-pixel
        if cfg.levels == 1:
            self.pre_b, self.quant = nn.Conv2d(hid, D, 1), nn.ModuleList([q()])
            self.dec = decoder(D, n_out, hid, rh, nr, n_down)
        else:
            self.enc_t, self.pre_t = encoder(hid, hid, rh, nr, 1), nn.Conv2d(hid, D, 1)  # -> (B, D, H/2down, W/2down)
            self.dec_t = decoder(D, D, hid, rh, nr, 1)  # the decoded top, at the bottom resolution
            self.pre_b, self.quant = nn.Conv2d(hid + D, D, 1), nn.ModuleList([q(), q()])
            self.up_t = nn.ConvTranspose2d(D, D, 4, 2, 1)  # the top codes, upsampled for the decoder
            self.dec = decoder(2 * D, n_out, hid, rh, nr, n_down)
        self.code_shapes = [(H // (cfg.down * 2 ** (cfg.levels - 1 - i)), W // (cfg.down * 2 ** (cfg.levels - 1 - i))) for i in range(cfg.levels)]

    def encode(self, x):
        """x in [0, 1] -> per level (top first): encoder output z_e, chosen codes z_q, straight-through z, codes, counts."""
        h_b, levels = self.enc_b(2 * x - 1), []
        def quantize(z_e, quant):
            z_q, codes, n = quant(z_e)
            z_st = z_e + (z_q - z_e).detach()  # straight-through: the value of z_q, the gradient of z_e
            levels.append(dict(z_e=z_e, z_q=z_q, z_st=z_st, codes=codes, n=n))
            return z_st
        if self.levels == 1:
            quantize(self.pre_b(h_b), self.quant[0])
        else:
            z_t = quantize(self.pre_t(self.enc_t(h_b)), self.quant[0])
            quantize(self.pre_b(torch.cat([h_b, self.dec_t(z_t)], 1)), self.quant[1])  # bottom, given the decoded top
        return levels

    def decode(self, z):  # z: the code vectors of each level, top first -> the likelihood's parameters (B, n_out, H, W)
        return up(self.dec(z[0] if self.levels == 1 else torch.cat([self.up_t(z[0]), z[1]], 1)))

    def decode_codes(self, codes):  # integer code maps, top first -> the decoder's mean image in [0, 1]
        return self.mean_image(self.decode([F.embedding(c, q.embed).permute(0, 3, 1, 2) for c, q in zip(codes, self.quant)]))

    def log_px_z(self, x, out):
        """log p(x | z) summed over the sub-pixels (B,): discretized logistic; for --recon mse, -||g(e) - x||^2."""
        if not self.logistic:
            return -(out - (2 * x - 1)).pow(2).flatten(1).sum(1)
        mean, log_scale = out.chunk(2, dim=1)
        return discretized_logistic_log_prob(2 * x - 1, mean, log_scale).flatten(1).sum(1)

    def mean_image(self, out):
        return ((out[:, : self.shape[0]] + 1) / 2).clamp(0, 1)

    def forward(self, x):  # the loss, so that DDP sees one forward
        return vqvae_loss(self, x)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (arXiv 1606.05328, fig. 2): the vertical stack v sees the rows above, the horizontal
    stack h the row up to here; y = tanh(W_f * x + V_f c) . sigmoid(W_g * x + V_g c); v feeds h through a 1x1
    convolution; h has a residual connection. Causal by padding: v is a (k//2+1) x k convolution over the rows
    <= i, h a 1 x (k//2+1) convolution over the columns <= j; the inputs of the first layer are shifted (v down by
    one row, h right by one column), so no output ever sees its own or a later position."""

    def __init__(self, c, k, cond):
        super().__init__()
        self.k = k
        self.v, self.h = nn.Conv2d(c, 2 * c, (k // 2 + 1, k)), nn.Conv2d(c, 2 * c, (1, k // 2 + 1))
        self.v_to_h, self.h_out = nn.Conv2d(2 * c, 2 * c, 1), nn.Conv2d(c, c, 1)
        self.cond = nn.Conv2d(c, 4 * c, 1, bias=False) if cond else None  # V c for both stacks' gates

    def forward(self, v, h, c=None):
        p = self.k // 2
        v_feat = self.v(F.pad(v, (p, p, p, 0)))  # (B, 2c, H, W): rows i-p..i, columns j-p..j+p
        h_feat = self.h(F.pad(h, (p, 0, 0, 0))) + self.v_to_h(v_feat)  # columns j-p..j of this row, and the rows above
        if self.cond is not None and c is not None:
            c_v, c_h = self.cond(c).chunk(2, 1)  # (B, 2c, H or 1, W or 1)
            v_feat, h_feat = v_feat + c_v, h_feat + c_h
        gate = lambda a: torch.tanh(a.chunk(2, 1)[0]) * torch.sigmoid(a.chunk(2, 1)[1])
        return gate(v_feat), h + self.h_out(gate(h_feat))


class GatedPixelCNN(nn.Module):
    """p(z) = prod_i p(z_i | z_<i, [y], [top codes]) over a K-valued code map in raster order. With cond_K > 0 (the
    bottom prior) a conditioning stack reads the whole top code map at its own resolution (a 3x3 convolution, then
    residual blocks) and is upsampled x2 (nearest) to this map; it enters every gate."""

    def __init__(self, K, c, layers, n_classes=0, cond_K=0, cond_layers=4):
        super().__init__()
        self.emb = nn.Embedding(K, c)
        self.cls = nn.Embedding(n_classes, c) if n_classes else None
        self.top_emb = nn.Embedding(cond_K, c) if cond_K else None
        self.top_net = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), *[ResBlock(c, c) for _ in range(cond_layers)]) if cond_K else None
        self.layers = nn.ModuleList([GatedLayer(c, 7 if i == 0 else 3, bool(n_classes or cond_K)) for i in range(layers)])
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, K, 1))

    def forward(self, codes, y=None, top=None):
        """codes (B, H, W) long [, y (B,) long] [, top (B, H/2, W/2) long] -> logits (B, K, H, W)."""
        e = self.emb(codes).permute(0, 3, 1, 2)  # (B, c, H, W)
        v, h = F.pad(e, (0, 0, 1, 0))[:, :, :-1], F.pad(e, (1, 0, 0, 0))[..., :-1]  # shifted down / right by one
        c = 0
        if self.cls is not None:
            c = c + self.cls(y)[:, :, None, None]  # (B, c, 1, 1)
        if self.top_emb is not None:
            c = c + F.interpolate(self.top_net(self.top_emb(top).permute(0, 3, 1, 2)), size=codes.shape[1:], mode="nearest")
        for layer in self.layers:
            v, h = layer(v, h, c if torch.is_tensor(c) else None)
        return self.out(h)


class Priors(nn.Module):
    """The prior of each level, top first: p(z_t) (or p(z) for one level), then p(z_b | z_t)."""

    def __init__(self, cfg, n_classes):
        super().__init__()
        self.class_cond, self.n_classes = cfg.class_cond, n_classes
        n_cls = n_classes if cfg.class_cond else 0
        self.nets = nn.ModuleList([GatedPixelCNN(cfg.codes, cfg.prior_channels, cfg.prior_layers, n_cls)] + (
            [GatedPixelCNN(cfg.codes, cfg.prior_channels, cfg.prior_layers, n_cls, cfg.codes, cfg.prior_cond_layers)] if cfg.levels == 2 else []))

    def logits(self, codes, y=None):
        return [net(c, y, codes[0] if i else None) for i, (net, c) in enumerate(zip(self.nets, codes))]

    def forward(self, codes, y=None):  # the loss, so that DDP sees one forward
        return prior_loss(self, codes, y)


# ----------------------------------------------------------------------------- objective
def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of 8-bit values x in [-1, 1] (bins of width 2/255 around k/127.5 - 1) under a logistic
    (mean, scale) discretized into those bins, the edge bins extended to -inf / +inf (PixelCNN++).
    Stable form: log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(b - a))."""
    log_scale = log_scale.clamp(min=-7.0)  # as PixelCNN++: scale >= e^-7, far below a bin's width
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)  # the bin's edges, standardised
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    return torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), log_mid))


def perplexity(n):
    """exp(H(p)), p = n / sum(n): K for uniform use of K codes, 1 for a single code."""
    p = n / n.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def bits_per_dim(nll_nats, model):
    return common.bits_per_dim(nll_nats, math.prod(model.shape))


# slide "VQ-VAE": L = ||g(e) - x||^2 (here -log p(x|z_q(x))) + ||sg(f(x)) - e||^2 + beta ||f(x) - sg(e)||^2,
# each a sum over one image, averaged over the batch; the decoder reads z_q with the straight-through gradient
def vqvae_loss(model, x):
    levels = model.encode(x)
    recon = -model.log_px_z(x, model.decode([lv["z_st"] for lv in levels])).mean()
    sq = lambda a, b: (up(a) - up(b)).pow(2).flatten(1).sum(1).mean()
    codebook = sum(sq(lv["z_e"].detach(), lv["z_q"]) for lv in levels)  # (2): moves the codes only
    commit = sum(sq(lv["z_e"], lv["z_q"].detach()) for lv in levels)  # (3): moves the encoder only
    ema = model.quant[0].ema
    loss = recon + (0 if ema else codebook) + model.beta * commit  # ema: the codes move by their update instead of (2)
    n_codes = sum(lv["codes"][0].numel() for lv in levels)
    terms = {"loss": loss, "recon": recon, "commit": commit} | ({} if ema else {"vq": codebook})
    if model.logistic:  # the bound with the uniform prior: -log p(x|z) + D_z log K
        terms["bpd_uniform"] = bits_per_dim(recon + n_codes * math.log(model.quant[0].K), model)
    for name, lv, q in zip(("top", "bottom") if model.levels == 2 else ("",), levels, model.quant):
        terms[f"ppl{'_' + name if name else ''}"] = perplexity(lv["n"])
        terms[f"dead{'_' + name if name else ''}"] = q.dead()
    return loss, terms


# the prior's term of the bound: -log p(z) = -sum_i log p(z_i | z_<i) (nats per image), per level
def prior_nll(priors, codes, y=None):
    return [F.cross_entropy(up(lg), c, reduction="none").flatten(1).sum(1) for lg, c in zip(priors.logits(codes, y), codes)]


def prior_loss(priors, codes, y=None):
    nll = prior_nll(priors, codes, y)
    loss = sum(n.mean() for n in nll)
    terms = {"loss": loss} | ({"nll_top": nll[0].mean(), "nll_bottom": nll[1].mean()} if len(nll) == 2 else {})
    return loss, terms


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_codes(priors, shapes, n, device, y=None, temperature=1.0):
    """Ancestral sampling over each code map in raster order (H W prior evaluations per level, no caching): the top
    codes first, then the bottom codes given them."""
    codes = []
    for net, (H, W) in zip(priors.nets, shapes):
        z = torch.zeros(n, H, W, dtype=torch.long, device=device)
        for i in range(H):
            for j in range(W):  # z_ij depends only on the codes already drawn
                logits = net(z, y, codes[0] if codes else None)[:, :, i, j].float() / temperature
                z[:, i, j] = torch.multinomial(torch.softmax(logits, 1), 1)[:, 0]
        codes.append(z)
    return codes


@torch.no_grad()
def sample(model, priors, n, device, temperature=1.0):
    """x ~ g(z), z ~ p(z): codes from the prior(s), then the decoder's mean image; class-conditional priors: the
    classes in turn (one per column of a grid n_classes wide)."""
    y = torch.arange(n, device=device) % priors.n_classes if priors.class_cond else None
    return model.decode_codes(sample_codes(priors, model.code_shapes, n, device, y, temperature))


@torch.no_grad()
def reconstruct(model, x):
    return model.mean_image(model.decode([lv["z_q"] for lv in model.encode(x)]))


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, priors, data, cfg, run, step):
    """On the test set (fp32): -log p(x | z_q(x)), reconstruction MSE in [0, 1], perplexity and never-chosen codes
    per level, the bound with the uniform prior (+ D_z log K) and, with priors, with the learned prior (- log p(z))."""
    model.eval()
    priors.eval() if priors is not None else None
    recon, mse, prior, counts, n_test = [], [], [], [torch.zeros(q.K, device=run.device) for q in model.quant], 0
    labels = data.test_labels[:cfg.eval_n or None] if data.test_labels is not None else None
    for i, x in enumerate(common.test_batches(data, cfg, run.device, 200, "reconstruction, codebook use and the bpd bounds")):
        levels = model.encode(x)
        out = model.decode([lv["z_q"] for lv in levels])
        recon.append(-model.log_px_z(x, out))
        mse.append((model.mean_image(out) - x).pow(2).flatten(1).mean(1))
        for c, lv in zip(counts, levels):
            c += lv["n"]
        if priors is not None:
            y = labels[200 * i: 200 * i + len(x)].to(run.device) if priors.class_cond else None
            prior.append(sum(prior_nll(priors, [lv["codes"] for lv in levels], y)))
        n_test += len(x)
    model.train()
    priors.train() if priors is not None else None
    recon, n_codes = torch.cat(recon).mean().item(), sum(h * w for h, w in model.code_shapes)
    names = ("top", "bottom") if model.levels == 2 else ("",)
    health = {f"{k}{'_' + n if n else ''}": v for n, c in zip(names, counts)
              for k, v in (("perplexity", perplexity(c).item()), ("dead", int((c == 0).sum())))}
    extras = dict(mse=torch.cat(mse).mean().item(), **health, levels=model.levels, codes=model.quant[0].K, code_dim=model.quant[0].D,
                  n_code_positions=n_codes, class_cond=priors is not None and priors.class_cond)
    if not model.logistic:  # no likelihood: the squared error is not a log-probability
        return common.eval_record(step, None, "bpd", None, n_test, recon_sq=recon, **extras)
    uniform = bits_per_dim(recon + n_codes * math.log(model.quant[0].K), model)
    learned = bits_per_dim(recon + torch.cat(prior).mean().item(), model) if priors is not None else None
    return common.eval_record(step, learned if learned is not None else uniform, "bpd", "bound", n_test,
                              prior="learned" if learned is not None else "uniform", bpd_uniform_prior=uniform,
                              bpd_learned_prior=learned, recon_bpd=bits_per_dim(recon, model),
                              prior_bpd=bits_per_dim(torch.cat(prior).mean().item(), model) if learned is not None else None, **extras)


# ----------------------------------------------------------------------------- train
def prior_path(cfg):
    return cfg.prior_ckpt or os.path.join(os.path.dirname(cfg.ckpt) or ".", "prior.pt")


def load_priors(cfg, device):
    """The prior checkpoint (prior_path), built with its own prior settings, or None if there is none."""
    path = prior_path(cfg)
    if not os.path.isfile(path):
        return None
    ckpt = common.load_checkpoint(path, (PRIOR,))
    own = {k: v for k, v in ckpt["config"].items() if k.startswith("prior_") and k != "prior_ckpt" or k == "class_cond"}
    priors = Priors(replace(cfg, **own), ckpt["n_classes"])
    common.load_model_state(priors, ckpt["model"], path)
    return priors.to(device).eval()


def save_images(model, priors, x, cfg, out, step):  # reconstructions (autoencoder stage) or samples (prior stage)
    model.eval()
    if priors is None:
        common.save_grid(torch.cat([x, reconstruct(model, x)]), out / f"recon_{step}.png", nrow=len(x))  # top row: data
    else:
        priors.eval()
        common.save_grid(sample(model, priors, 60 if priors.class_cond else 64, x.device, cfg.temperature), out / f"samples_{step}.png",
                         nrow=10 if priors.class_cond else 8)
        priors.train()
    model.train()


def train_ae(cfg, data, run, model):
    """Stage 1: the autoencoder and its codebook(s)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    run.print(f"VQ-VAE{'-2' if cfg.levels == 2 else ''} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"codes {' + '.join(f'{h}x{w}' for h, w in model.code_shapes)}, K = {cfg.codes}, D = {cfg.code_dim}, "
              f"codebook by {cfg.codebook}{', dead-code restart' if cfg.restart else ''}, {cfg.recon} reconstruction)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            with run.autocast():
                loss, terms = net(x)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, None, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(model, None, fixed, cfg, run.out, step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        save_images(model, None, fixed, cfg, run.out, step)
        log.write(evaluate(model, None, data, cfg, run, step))


def train_prior(cfg, data, run, model, n_classes):
    """Stage 2: the gated PixelCNN prior(s) on the codes of the frozen encoder; its own checkpoint (prior_path)."""
    pcfg = replace(cfg, steps=cfg.prior_steps, lr=cfg.prior_lr, ckpt=prior_path(cfg))  # what common's helpers read
    model.eval().requires_grad_(False)  # frozen: the codes of a training image never change
    priors = Priors(cfg, n_classes).to(run.device)
    opt = torch.optim.Adam(priors.parameters(), lr=cfg.prior_lr, fused=run.fused)
    update = common.Update(opt, priors, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, pcfg, run, labels=True)
    step = common.resume(pcfg, run, PRIOR, priors, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(priors, run, pcfg), common.Logger(pcfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    run.print(f"prior: {len(priors.nets)} gated PixelCNN(s), {sum(p.numel() for p in priors.parameters()) / 1e6:.2f}M parameters, "
              f"{cfg.prior_layers} layers of width {cfg.prior_channels}" + (", class-conditional" if cfg.class_cond else ""))

    def checkpoint():
        common.save_checkpoint(pcfg, run, PRIOR, step, model=priors, optimizer=opt, batches=batches, update=update, n_classes=n_classes)

    with common.Stop(run, pcfg) as stop:
        while step < pcfg.steps and not stop(step):
            x, y = next(batches)
            with torch.no_grad():  # in fp32, as evaluate encodes: the prior learns the codes it is tested on
                codes = [lv["codes"] for lv in model.encode(x)]
            with run.autocast():
                loss, terms = net(codes, y if cfg.class_cond else None)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms | {"bpd_prior": bits_per_dim(terms["loss"].detach(), model)})
            if run.main and common.every(step, cfg.eval_every) and step < pcfg.steps:
                log.write(evaluate(model, priors, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < pcfg.steps:
                save_images(model, priors, fixed, cfg, run.out, f"prior_{step}")
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(priors, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= pcfg.steps:
        save_images(model, priors, fixed, cfg, run.out, f"prior_{step}")
        log.write(evaluate(model, priors, data, cfg, run, step))
    return priors


def check(cfg, data):
    if data.kind != "image":
        common.fail(f"vqvae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    bad = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("hidden", "res_hidden", "codes", "code_dim", "prior_steps",
                                                                  "prior_channels", "prior_layers") if getattr(cfg, k) < 1]
    bad += [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("n_res", "prior_cond_layers", "beta", "restart_below") if getattr(cfg, k) < 0]
    bad += [f"--decay {cfg.decay}"] * (not 0 < cfg.decay < 1) + [f"--prior-lr {cfg.prior_lr}"] * (not cfg.prior_lr > 0)
    bad += [f"--temperature {cfg.temperature}"] * (not cfg.temperature > 0)
    if bad:
        common.fail(f"{bad[0]} out of range; accepted: --hidden, --res-hidden, --codes, --code-dim, --prior-steps, --prior-channels, "
                    "--prior-layers >= 1; --n-res, --prior-cond-layers, --beta, --restart-below >= 0; 0 < --decay < 1; "
                    "--prior-lr, --temperature > 0")
    if cfg.class_cond and data.train_labels is None:
        common.fail(f"--class-cond needs labels; --dataset {cfg.dataset} has none")


def train(cfg):
    data = common.load_data(cfg)
    check(cfg, data)
    run = common.setup(cfg, METHOD)
    model = VQVAE(cfg, data.shape).to(run.device)
    n_classes = int(data.train_labels.max()) + 1 if data.train_labels is not None else 0
    if cfg.stage in ("all", "ae"):
        train_ae(cfg, data, run, model)
        if cfg.stage == "ae":
            return model, None
    else:  # the prior stage reads the finished autoencoder
        ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
        common.load_model_state(model, ckpt["model"], cfg.ckpt)
        if ckpt["step"] < cfg.steps:
            run.print(f"prior: the autoencoder {cfg.ckpt} is at step {ckpt['step']} of {cfg.steps}")
    return model, train_prior(cfg, data, run, model, n_classes)


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = VQVAE(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    priors = load_priors(cfg, run.device)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        if priors is None:
            common.fail(f"--sample needs a trained prior; none at {prior_path(cfg)} (run --stage prior, or give --prior-ckpt)")
        t = time.time()
        x = sample(model, priors, cfg.sample, run.device, cfg.temperature).cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png", nrow=priors.n_classes if priors.class_cond else None)
        passes = sum(h * w for h, w in model.code_shapes)
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.1f} images/s, {passes} prior evaluations and 1 decoder "
              f"evaluation each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, priors, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
