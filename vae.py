"""Variational Autoencoder (VAE), and the three posterior-collapse remedies of the slides.

Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114. KL warm-up: Bowman et al.,
arXiv 1511.06349 (and Sonderby et al., arXiv 1602.02282). Free bits: Kingma et al., arXiv 1606.04934.
WAE-MMD: Tolstikhin et al., arXiv 1711.01558. Aggressive inference-network training: He et al., arXiv 1901.05534.
Active units and the importance-sampled NLL: Burda et al., arXiv 1509.00519.
Slides: "Variational Autoencoder (VAE)" and "Posterior collapse".

A prior p(z) = N(0, I) and a decoder p_theta(x|z) are fit by maximising the evidence lower bound,
with an encoder q_phi(z|x) = N(mu, diag sigma^2) that amortizes inference over the data set:

    log p(x) >= ELBO = E_{z ~ q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z))
    z = mu + sigma * eps,  eps ~ N(0, I)                               (reparameterization trick)
    KL = sum_k -log sigma_k + sigma_k^2 / 2 + mu_k^2 / 2 - 1/2          (the slide prints sigma_k^2 / 2 twice:
                                                                         one of them is mu_k^2 / 2)
    log p(x) ~= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x)  (test NLL: importance sampling)
Posterior collapse (KL -> 0: z ignored when the decoder can model x alone) and the slide's three remedies:
    1. weaken the KL: loss = -E[log p(x|z)] + beta * sum_k max(lambda, E_batch KL_k)  (warm-up beta: 0 -> 1; free bits)
    2. match the aggregated posterior: loss = -E[log p(x|z)] + lambda MMD(q(z), p(z))   (--objective wae, IMQ kernel)
    3. improve the optimisation: encoder steps until the loss stops falling, then one decoder step, while the
       mutual information I_q = E_x KL(q(z|x) || p(z)) - KL(q(z) || p(z)) still rises (--aggressive)

Likelihoods p(x|z): Bernoulli for --binarize data (NLL in nats per image); for 8-bit data a
logistic discretized into the 256 bins of each sub-pixel (PixelCNN++, Salimans et al. arXiv
1701.05517), an exact discrete likelihood in bits/dim with no dequantization. `--decoder pixelcnn`: an
autoregressive decoder p(x|z) = prod_i p(x_i | x_<i, z) (masked convolutions, z as a per-channel bias in every
layer; one-channel images), with which a plain VAE collapses. Grids show the decoder's mean (Bernoulli
probabilities / logistic locations), the usual way VAE samples are shown; with the PixelCNN decoder, samples drawn
pixel by pixel. Binarized data: the networks read x itself and the Bernoulli output bias starts at the logit of the
mean training image, as Burda et al.'s code (yburda/iwae; the PixelCNN decoder: of the mean grey level).

Remedy details. WAE-MMD as the official code (tolstikhin/wae wae.py): k(z, z') = C / (C + ||z - z'||^2) summed over
C = 2 K s, s in {0.1, ..., 10}, unbiased within-sample terms; differences: the cost is -log p(x|z) of this file's
decoder (the paper: 0.05 ||x - G(z)||^2 with a deterministic decoder) and q(z|x) stays Gaussian, sampled (their
e_noise = gaussian; the paper's MNIST runs use deterministic encoders), so that KL, ELBO and the importance-sampled
NLL are reported as for the other runs; --wae-lambda's default 10 is the paper's MNIST value for its cost, not
tuned for this one. Aggressive training as He et al.'s image.py: before each decoder step, up to 99 encoder steps
on fresh batches, stopped when the mean loss of the last 10 rises; the decoder step then updates the decoder only;
I_q (their estimator: the aggregated posterior as the mixture over the examples) is checked every
--aggressive-every steps (default: one epoch, as they do) on 1000 fixed training images (they use a validation set),
and training turns to plain joint steps after --aggressive-patience (5) checks without a new best; one Adam
for both networks (a network without gradient is skipped, so its moments stay as if it had its own; they use two).

Simplifications: none in the objective. Presets: `fashion-mnist` is a small MLP for CPU (the
`make demo` run); `mnist` uses the MLP of Burda et al. (one stochastic layer, 2 x 200 tanh units,
50 latents, batch 20) with constant lr 1e-3 for 1M steps instead of their 3280-epoch schedule
(iwae.py has that schedule); `cifar10` is a plain conv VAE baseline (no paper number to match).

Run:
    python vae.py                                       # fashion-mnist, MLP, 8-bit likelihood (make demo)
    python vae.py --dataset mnist --data-dir DIR        # binarized MNIST, the MLP of Burda et al.
    python vae.py --dataset cifar10 --compile           # conv VAE on a GPU
    python vae.py --eval --ckpt runs/vae/fashion-mnist/ckpt.pt --eval-k 5000

Result (`python vae.py`, the make demo run: fashion-mnist, 8000 steps of batch 128, 2 CPU cores, 44 it/s):
    test NLL 3.487 bits/dim (importance-sampled estimate, k = 1000, first 1000 test images),
    -ELBO 3.544 bits/dim (bound), KL 33.1 nats, 15 of 32 latent units active. The same code and seed gave
    3.491 / 3.548 / 32.3 nats / 19 units on the machine of the earlier runs (49 it/s): floating-point
    summation order differs between machines, so differences of a few thousandths of a bit need repeats; with
    OMP_NUM_THREADS=1 the same run gives 3.4824 / 3.5424 / 33.9 nats / 14 units.
`python vae.py --dataset mnist --data-dir DIR --steps 50000 --log-every 5000 --eval-n 1000` (17 epochs, one core):
    93.94 nats (k = 5000), -ELBO 102.72, KL 23.5, 19 of 50 units active, I_q 6.99 (paper, 3280 epochs: 86.76).
Posterior collapse, binarized Fashion-MNIST, `--binarize --decoder pixelcnn --ar-layers 5 --ar-channels 16
--batch-size 32 --steps 4000 --eval-n 1000 --eval-k 100` + the remedy's flags (README's table; nats, one seed):
    remedy                    KL      active  I_q    -ELBO    IS NLL (k = 100)
    none                      2.94     6      2.81   242.53   241.27
    --kl-warmup 2000          3.20    11      2.92   242.72   241.26
    --free-bits 0.25          8.02    32      3.66   246.52   242.53
    --objective wae         164.81    32      6.82   394.77   385.72   (q nearly a point: both figures loose)
    --aggressive              3.67     6      3.13   241.08   240.13   (--aggressive-every 200; 4.6x the time)
    MLP decoder, none        10.59    15      6.73   248.27   244.48
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "vae"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    arch: str = common.choice("mlp", "conv")  # encoder/decoder networks
    latent: int = 32  # K, the dimension of z
    hidden: int = 512  # MLP width, or the conv base channels
    layers: int = 2  # hidden layers of each MLP
    act: str = common.choice("relu", "tanh", "elu")  # activation of the hidden layers
    decoder: str = common.choice("arch", "pixelcnn")  # p(x|z): the --arch network, or a PixelCNN over x conditioned on z
    ar_layers: int = 6  # pixelcnn decoder: masked convolutions (one 7x7 mask A, then 5x5 mask B)
    ar_channels: int = 32  # pixelcnn decoder: feature maps per masked convolution
    objective: str = common.choice("elbo", "wae")  # elbo: -ELBO (+ warm-up / free bits); wae: -E_q log p(x|z) + lambda MMD(q(z), p(z))
    wae_lambda: float = 10.0  # WAE-MMD: weight of the MMD penalty (the paper's MNIST value, for its squared-error cost)
    kl_warmup: int = 0  # steps over which beta rises linearly from 0 to 1 (0 = beta is 1 throughout)
    free_bits: float = 0.0  # lambda: floor in nats on each latent dimension's batch-mean KL (0 = off)
    aggressive: bool = False  # He et al.: before each decoder step, encoder steps until the loss stops falling, while I_q rises
    aggressive_every: int = 0  # steps between the mutual-information checks that end the aggressive phase (0 = one epoch)
    aggressive_patience: int = 5  # checks with no new best I_q after which updates turn to plain VAE steps (their image.py: 5)
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    eval_k: int = 1000  # importance samples per test example for the NLL estimate


PRESETS = {
    "fashion-mnist": dict(arch="mlp", latent=32, hidden=512, layers=2, act="relu", steps=8000, batch_size=128,
                          lr=1e-3, log_every=500, ckpt_every=2000, eval_n=1000, eval_k=1000),
    "mnist": dict(binarize=True, arch="mlp", latent=50, hidden=200, layers=2, act="tanh", steps=1_000_000,
                  batch_size=20, lr=1e-3, log_every=1000, ckpt_every=20000, eval_every=100_000, eval_k=5000),
    "cifar10": dict(arch="conv", latent=128, hidden=64, act="relu", steps=100_000, batch_size=128, lr=1e-3,
                    grad_clip=200.0, log_every=500, ckpt_every=5000, eval_every=20000, eval_n=2000),
}


# ----------------------------------------------------------------------------- networks
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mlp(d_in, d_out, hidden, layers, act):
    dims = [d_in] + [hidden] * layers
    blocks = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), ACTS[act]())]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], d_out))


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution that sees only the pixels above and to the left of the centre; mask "A" (the first layer)
    also hides the centre itself, mask "B" lets it through (PixelCNN, van den Oord et al. arXiv 1601.06759)."""

    def __init__(self, c_in, c_out, k, mask_type):
        super().__init__(c_in, c_out, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2 + (mask_type == "B"):] = 0  # the centre row: from the centre (A) or after it (B)
        mask[:, :, k // 2 + 1:] = 0  # every row below
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNNDecoder(nn.Module):
    """p(x|z) = prod_i p(x_i | x_<i, z) over the raster order of a one-channel image: masked convolutions over x with
    z added to every layer as a per-channel bias (the conditional PixelCNN of van den Oord et al. arXiv 1606.05328,
    without gates). Strong enough to model x without z: the setting in which a VAE's posterior collapses."""

    def __init__(self, K, channels, layers, n_out):
        super().__init__()
        self.convs = nn.ModuleList([MaskedConv2d(1, channels, 7, "A")] + [MaskedConv2d(channels, channels, 5, "B") for _ in range(layers - 1)])
        self.cond, self.out = nn.Linear(K, channels * layers), nn.Conv2d(channels, n_out, 1)

    def forward(self, x, z):
        """x (B, 1, H, W) in [-1, 1], z (B, K) -> the per-pixel likelihood parameters (B, n_out, H, W)."""
        c = self.cond(z).view(len(z), len(self.convs), -1, 1, 1)  # (B, L, channels, 1, 1)
        h = x
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h) + c[:, i]) + (h if i > 0 else 0)  # residual after the first layer
        return self.out(h)


class VAE(nn.Module):
    """Encoder q_phi(z|x) = N(mu, diag exp(logvar)), prior p(z) = N(0, I), decoder p_theta(x|z)."""

    def __init__(self, cfg, shape, train_mean=None):
        super().__init__()
        self.shape, self.bernoulli, self.latent, self.ar = tuple(shape), cfg.binarize, cfg.latent, cfg.decoder == "pixelcnn"
        C, H, W = self.shape
        self.n_out = 1 if cfg.binarize else 2  # Bernoulli logits | (logistic mean, log scale) per sub-pixel
        K, h = cfg.latent, cfg.hidden
        if cfg.arch == "mlp":
            self.enc = nn.Sequential(nn.Flatten(), mlp(C * H * W, 2 * K, h, cfg.layers, cfg.act))
            self.dec = nn.Sequential(mlp(K, self.n_out * C * H * W, h, cfg.layers, cfg.act), nn.Unflatten(1, (self.n_out * C, H, W)))
        else:  # two stride-2 stages: needs H, W divisible by 4
            if H % 4 or W % 4:
                common.fail(f"--arch conv needs image sides divisible by 4 (got {H}x{W})")
            act, s = ACTS[cfg.act], (4 * h, H // 4, W // 4)
            self.enc = nn.Sequential(
                nn.Conv2d(C, h, 3, padding=1), act(), nn.Conv2d(h, 2 * h, 4, 2, 1), act(),  # (B, 2h, H/2, W/2)
                nn.Conv2d(2 * h, 4 * h, 4, 2, 1), act(), nn.Flatten(), nn.Linear(math.prod(s), 2 * K))  # (B, 2K)
            self.dec = nn.Sequential(
                nn.Linear(K, math.prod(s)), act(), nn.Unflatten(1, s),  # (B, 4h, H/4, W/4)
                nn.ConvTranspose2d(4 * h, 2 * h, 4, 2, 1), act(), nn.ConvTranspose2d(2 * h, h, 4, 2, 1), act(),
                nn.Conv2d(h, self.n_out * C, 3, padding=1))  # (B, n_out*C, H, W)
        if self.ar:
            if C != 1:
                common.fail(f"--decoder pixelcnn models one-channel images; --dataset {cfg.dataset} has {C} channels")
            self.dec = PixelCNNDecoder(K, cfg.ar_channels, cfg.ar_layers, self.n_out)
        if self.bernoulli and train_mean is not None:  # as Burda et al.'s code: output bias = logit of the mean image
            last = [m for m in self.dec.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
            with torch.no_grad():
                last.bias.copy_(torch.logit(train_mean.clamp(0.001, 0.999)).flatten() if last.bias.numel() == C * H * W
                                else torch.logit(train_mean.mean().clamp(0.001, 0.999)).expand_as(last.bias))

    def inputs(self, x):  # what the networks see: binary x itself (Burda et al.'s code), 8-bit data as 2x - 1
        return x if self.bernoulli else 2 * x - 1

    def encode(self, x):
        """x in [0, 1] -> mu, logvar of q(z|x), in fp32."""
        mu, logvar = up(self.enc(self.inputs(x))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, x, z):  # the likelihood's parameters; the PixelCNN decoder reads x too (teacher forcing)
        return up(self.dec(2 * x - 1, z) if self.ar else self.dec(z))

    def log_px_z(self, x, z):
        """log p_theta(x|z) summed over all sub-pixels, (B,), in fp32."""
        out = self.decode(x, z)
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        mean, log_scale = out.chunk(2, dim=1)
        return discretized_logistic_log_prob(2 * x - 1, mean, log_scale).flatten(1).sum(1)

    def mean_image(self, z):
        """The decoder's mean image in [0, 1] (Bernoulli probabilities / logistic locations); with the PixelCNN decoder
        there is none: a sample drawn pixel by pixel (H W decoder passes), as autoregressive models are shown."""
        if not self.ar:
            out = self.decode(None, z)
            return torch.sigmoid(out) if self.bernoulli else ((out[:, : self.shape[0]] + 1) / 2).clamp(0, 1)
        x = torch.zeros(len(z), *self.shape, device=z.device, dtype=z.dtype)
        for i in range(self.shape[1]):
            for j in range(self.shape[2]):  # raster order: x_ij depends only on the pixels already drawn
                out = self.decode(x, z)[:, :, i, j]
                if self.bernoulli:
                    x[:, 0, i, j] = torch.bernoulli(torch.sigmoid(out[:, 0]))
                else:  # a logistic sample, rounded to the 8-bit grid
                    u = torch.rand_like(out[:, 0]).clamp(1e-5, 1 - 1e-5)
                    v = out[:, 0] + out[:, 1].clamp(min=-7).exp() * (u.log() - (-u).log1p())
                    x[:, 0, i, j] = ((v.clamp(-1, 1) + 1) * 127.5).round() / 255
        return x

    def forward(self, x, beta=1.0, free_bits=0.0, objective="elbo", wae_lambda=10.0):  # the loss, so that DDP sees one forward
        return wae_loss(self, x, wae_lambda) if objective == "wae" else negative_elbo(self, x, beta, free_bits)


# ----------------------------------------------------------------------------- objective
# slide "VAE", reparameterization trick: z = mu + sigma * eps, eps ~ N(0, I)
def reparameterize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# slide "VAE", KL between normal distributions, per latent dimension:
# KL(N(mu, sigma^2) || N(0, 1)) = -log sigma + sigma^2 / 2 + mu^2 / 2 - 1/2
def kl_gaussian(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of 8-bit values x in [-1, 1] (bins of width 2/255 around k/127.5 - 1) under a logistic
    (mean, scale) discretized into those bins, the edge bins extended to -inf / +inf (PixelCNN++).
    Stable form: log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(b - a))."""
    log_scale = log_scale.clamp(min=-7.0)  # as PixelCNN++: scale >= e^-7, far below a bin's width
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)  # the bin's edges, standardised
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    return torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), log_mid))


# slide "VAE": ELBO = E_{z ~ q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z)), one reparameterized z, analytic KL
def elbo(x, mu, logvar, log_px_z):
    """Per example ELBO (B,) and the KL of each latent dimension (B, K)."""
    kl = kl_gaussian(mu, logvar)
    return log_px_z(x, reparameterize(mu, logvar)) - kl.sum(1), kl


# slide "Posterior collapse", remedy 1: weaken the KL term - anneal its weight beta from 0 to 1 (warm-up, Bowman et
# al.), or floor each latent dimension's batch-mean KL at lambda nats (free bits, Kingma et al. 2016: our take on the
# slide's "constraint >= delta"; Razavi et al.'s delta-VAE is a different method, which restricts the family of q
# so that KL >= delta holds by construction, not implemented here). beta = 1, lambda = 0: the loss is exactly -ELBO.
def negative_elbo(model, x, beta=1.0, free_bits=0.0):
    mu, logvar = model.encode(x)
    kl = kl_gaussian(mu, logvar)  # (B, K)
    recon = -model.log_px_z(x, reparameterize(mu, logvar)).mean()
    kl_k = kl.mean(0)  # batch-mean KL per latent dimension
    loss = recon + beta * (kl_k.clamp(min=free_bits) if free_bits > 0 else kl_k).sum()
    nelbo = recon + kl_k.sum()  # -ELBO in nats per example, whatever beta and lambda
    terms = {"loss": loss, "recon": recon, "kl": kl_k.sum(), "au": (mu.var(0) > 0.01).sum()}  # au: active units in the batch
    if not model.bernoulli:
        terms["bpd"] = common.bits_per_dim(nelbo, math.prod(model.shape))
    return loss, terms


# slide "Posterior collapse", remedy 2 (Tolstikhin et al., arXiv 1711.01558): match the aggregated posterior
# q(z) = E_x q(z|x) to p(z) instead of each q(z|x): MMD with the inverse multiquadratic kernel k(z, z') = C / (C +
# ||z - z'||^2), summed over C = 2 K s, s in {0.1, 0.2, 0.5, 1, 2, 5, 10} (official code, p(z) = N(0, I)); the
# within-sample terms are the unbiased U-statistics (diagonal left out), the cross term the mean over all n^2 pairs
def mmd_imq(z_q, z_p):
    n, K = z_q.shape
    sq = lambda a, b: (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)  # (n, n) ||a_i - b_j||^2
    C = 2 * K * torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0], device=z_q.device, dtype=z_q.dtype)[:, None, None]  # (7, 1, 1)
    k = lambda d: (C / (C + d)).sum(0)  # (n, n), summed over the scales
    off = 1 - torch.eye(n, device=z_q.device)
    return ((k(sq(z_q, z_q)) + k(sq(z_p, z_p))) * off).sum() / (n * n - n) - 2 * k(sq(z_q, z_p)).mean()


# WAE-MMD: min E_x E_q(z|x)[c(x, z)] + lambda MMD(q(z), p(z)), the cost c = -log p(x|z) of this file's decoder
def wae_loss(model, x, wae_lambda):
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar)
    recon = -model.log_px_z(x, z).mean()
    mmd = mmd_imq(z, torch.randn_like(z))
    kl = kl_gaussian(mu, logvar).mean(0).sum()  # not in the loss: shown, and the -ELBO it implies
    terms = {"loss": recon + wae_lambda * mmd, "recon": recon, "mmd": mmd, "kl": kl, "au": (mu.var(0) > 0.01).sum()}
    if not model.bernoulli:
        terms["bpd"] = common.bits_per_dim(recon + kl, math.prod(model.shape))
    return terms["loss"], terms


# He et al. (arXiv 1901.05534) eq. 7, as their code: I_q = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with the
# aggregated posterior q(z) = mean_x q(z|x) taken over the given examples; one z ~ q(z|x) per example
def mutual_info(mu, logvar):
    B, K = mu.shape
    neg_entropy = (-0.5 * K * math.log(2 * math.pi) - 0.5 * (1 + logvar).sum(1)).mean()  # E_q(z|x) log q(z|x), averaged
    z, inv_var = reparameterize(mu, logvar), torch.exp(-logvar)
    # (B, B) sum_k (z_ik - mu_jk)^2 / var_jk from the differences, 100 rows at a time: the expanded form
    # z^2/var - 2 z mu/var + mu^2/var cancels catastrophically in fp32 for narrow q (WAE: log var down to -21)
    quad = torch.cat([((zc[:, None] - mu[None]).pow(2) * inv_var[None]).sum(-1) for zc in z.split(100)])
    log_q = -0.5 * (K * math.log(2 * math.pi) + logvar.sum(1)[None] + quad)  # (B, B) log q(z_i | x_j)
    return neg_entropy - (torch.logsumexp(log_q, 1) - math.log(B)).mean()


# slide "IWAE" estimator: log p(x) ~= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x), in fp32
def log_px_importance(x, mu, logvar, log_px_z, k, chunk=64):
    """(B,) estimates of log p(x) from k importance samples, drawn `chunk` at a time."""
    log_w = []
    for i in range(0, k, chunk):
        c = min(chunk, k - i)
        z = reparameterize(mu.expand(c, *mu.shape), logvar.expand(c, *mu.shape))  # (c, B, K)
        log_px = log_px_z(x.expand(c, *x.shape).flatten(0, 1), z.flatten(0, 1)).view(c, -1)  # (c, B)
        log_w.append(log_px + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mu, logvar))
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device):
    """Ancestral sampling: z ~ p(z) = N(0, I), then the decoder's mean image."""
    return model.mean_image(torch.randn(n, model.latent, device=device))


@torch.no_grad()
def reconstruct(model, x):
    return model.mean_image(model.encode(x)[0])


@torch.no_grad()
def interpolate(model, x_a, x_b, n):
    """The slides' "transitions": decode z = (1 - t) mu(x_a) + t mu(x_b), t in [0, 1], n steps per row."""
    mu_a, mu_b = model.encode(x_a)[0], model.encode(x_b)[0]
    t = torch.linspace(0, 1, n, device=mu_a.device)[None, :, None]
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (pairs, n, K)
    return model.mean_image(z.flatten(0, 1))  # (pairs*n, C, H, W)


def save_images(model, x, out, step):
    model.eval()
    common.save_grid(sample(model, 64, x.device), out / f"samples_{step}.png")
    common.save_grid(torch.cat([x, reconstruct(model, x)]), out / f"recon_{step}.png", nrow=len(x))  # top: data
    common.save_grid(interpolate(model, x[: len(x) // 2], x[len(x) // 2:], 10), out / f"interp_{step}.png", nrow=10)
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test NLL by importance sampling with cfg.eval_k samples (an estimate whose expectation is an upper
    bound on the NLL), the negative ELBO (a bound), the KL, and the active units of Burda et al.
    (dimensions with Cov_x(E_q[z_k]) > 0.01), and the mutual information I_q of He et al. on the first 1000 test
    examples. fp32 throughout. Nats for binarized data, else bits/dim."""
    model.eval()
    log_px, nelbo, kl, mus, logvars = [], [], [], [], []
    for x in common.test_batches(data, cfg, run.device, 100, f"importance-sampled NLL (k = {cfg.eval_k}), -ELBO, KL, active units"):
        mu, logvar = model.encode(x)
        log_px.append(log_px_importance(x, mu, logvar, model.log_px_z, cfg.eval_k, chunk=max(1, 4000 // len(x))))
        e, kl_k = elbo(x, mu, logvar, model.log_px_z)
        nelbo.append(-e)
        kl.append(kl_k.sum(1))
        mus.append(mu)
        logvars.append(logvar)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    mus, logvars = torch.cat(mus), torch.cat(logvars)
    return common.eval_record(step, to_unit(-torch.cat(log_px).mean().item()), "nats" if cfg.binarize else "bpd", "estimate",
                              len(mus), k=cfg.eval_k, nelbo=to_unit(torch.cat(nelbo).mean().item()), nelbo_kind="bound",
                              kl_nats=torch.cat(kl).mean().item(), active_units=int((mus.var(0) > 0.01).sum()), latent=model.latent,
                              mi_nats=mutual_info(mus[:1000], logvars[:1000]).item(), objective=cfg.objective, decoder=cfg.decoder)


# ----------------------------------------------------------------------------- train
class AggressivePhase:
    """He et al.'s switch (their image.py): aggressive inference-network training until the mutual information I_q,
    checked every `every` steps on fixed training images, has failed `patience` times to beat its best so far."""

    def __init__(self, on, patience):
        self.on, self.patience, self.best, self.misses = on, patience, -math.inf, 0

    def check(self, mi):
        if mi > self.best:
            self.best = mi
        else:
            self.misses += 1
            self.on = self.misses < self.patience

    def state_dict(self):
        return {"on": self.on, "best": self.best, "misses": self.misses}

    def load_state_dict(self, s):
        self.on, self.best, self.misses = s["on"], s["best"], s["misses"]


# slide "Posterior collapse", remedy 3 (He et al. sec. 4, their image.py): update the encoder alone on fresh batches
# until the loss stops falling (its mean over 10 steps rises, at most 99 steps), before each decoder step
def aggressive_encoder_steps(model, net, batches, update, opt, run, loss_args):
    model.dec.requires_grad_(False)  # no gradient, so Adam skips the decoder (its moments untouched)
    n, window, prev = 0, 0.0, math.inf
    while n < 99:
        with run.autocast():
            loss, _ = net(next(batches), *loss_args)
        opt.zero_grad(set_to_none=True)
        update(loss)
        n, window = n + 1, window + loss.detach()
        if n % 10 == 0:
            mean = window.item() / 10  # one host sync per 10 inner steps: the stopping rule needs the value
            if mean > prev:
                break
            prev, window = mean, 0.0
    model.dec.requires_grad_(True)
    return n


def train(cfg):
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"vae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    if cfg.wae_lambda < 0 or cfg.aggressive_every < 0 or cfg.aggressive_patience < 1 or cfg.ar_layers < 1 or cfg.ar_channels < 1:
        common.fail("--wae-lambda, --aggressive-every >= 0 and --aggressive-patience, --ar-layers, --ar-channels >= 1 required")
    run = common.setup(cfg, METHOD)
    if cfg.aggressive and (run.world > 1 or cfg.compile):
        common.fail("--aggressive freezes the decoder between steps: run it in one process, without --compile")
    train_mean = sum(b.float().sum(0) for b in data.train.split(4096)) / (255 * len(data.train)) if cfg.binarize else None
    model = VAE(cfg, data.shape, train_mean).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    phase = AggressivePhase(cfg.aggressive, cfg.aggressive_patience)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, aggressive=phase)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))  # for reconstructions and interpolations
    mi_x = data.train[:1000].float().div(255).to(run.device)  # I_q is checked on these (fixed binarization)
    mi_x = torch.bernoulli(mi_x, generator=torch.Generator(run.device).manual_seed(0)) if cfg.binarize else mi_x
    every = cfg.aggressive_every or len(data.train) // cfg.batch_size
    run.print(f"VAE ({cfg.arch} encoder, {cfg.decoder if cfg.decoder == 'pixelcnn' else cfg.arch} decoder, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, K = {cfg.latent}, "
              f"{'Bernoulli' if cfg.binarize else 'discretized logistic'} likelihood, objective {cfg.objective}"
              + (", aggressive inference-network training" if cfg.aggressive else "") + ")")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update,
                               aggressive=phase, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            beta = min(1.0, (step + 1) / cfg.kl_warmup) if cfg.kl_warmup > 0 else 1.0  # KL warm-up
            loss_args = (torch.full((), beta, device=run.device), cfg.free_bits, cfg.objective, cfg.wae_lambda)
            inner = aggressive_encoder_steps(model, net, batches, update, opt, run, loss_args) if phase.on else 0
            x = next(batches)
            model.enc.requires_grad_(not phase.on)  # aggressive: this step updates the decoder only
            with run.autocast():
                loss, terms = net(x, *loss_args)
            opt.zero_grad(set_to_none=True)
            update(loss)
            model.enc.requires_grad_(True)
            step += 1
            log(step, {**terms, "inner": inner} if cfg.aggressive else terms)
            if phase.on and common.every(step, every):
                model.eval()
                with torch.no_grad():
                    phase.check(mutual_info(*model.encode(mi_x)).item())
                model.train()
                run.print(f"aggressive: I_q {phase.best:.3f} nats at best, {phase.misses} check(s) without a new best"
                          + ("" if phase.on else f"; plain VAE updates from step {step} on"))
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


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = VAE(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t = time.time()
        x = sample(model, cfg.sample, run.device).cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png")
        passes = math.prod(model.shape[1:]) if model.ar else 1
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.1f} images/s, {passes} decoder evaluation(s) each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
