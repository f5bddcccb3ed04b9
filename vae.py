"""Variational Autoencoder (VAE), with the posterior-collapse remedies of the slides.

Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114. KL warm-up: Bowman et al.,
arXiv 1511.06349 (and Sonderby et al., arXiv 1602.02282). Free bits: Kingma et al., arXiv 1606.04934.
Active units and the importance-sampled NLL: Burda et al., arXiv 1509.00519.
Slides: "Variational Autoencoder (VAE)" and "Posterior collapse".

A prior p(z) = N(0, I) and a decoder p_theta(x|z) are fit by maximising the evidence lower bound,
with an encoder q_phi(z|x) = N(mu, diag sigma^2) that amortizes inference over the data set:

    log p(x) >= ELBO = E_{z ~ q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z))
    z = mu + sigma * eps,  eps ~ N(0, I)                               (reparameterization trick)
    KL = sum_k -log sigma_k + sigma_k^2 / 2 + mu_k^2 / 2 - 1/2          (the slide prints sigma_k^2 / 2 twice:
                                                                         one of them is mu_k^2 / 2)
    loss = -E[log p(x|z)] + beta * sum_k max(lambda, E_batch KL_k)      (warm-up beta: 0 -> 1; free bits lambda)
    log p(x) ~= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x)  (test NLL: importance sampling)

Likelihoods p(x|z): Bernoulli for --binarize data (NLL in nats per image); for 8-bit data a
logistic discretized into the 256 bins of each sub-pixel (PixelCNN++, Salimans et al. arXiv
1701.05517), an exact discrete likelihood in bits/dim with no dequantization. Grids show the
decoder's mean (Bernoulli probabilities / logistic locations), the usual way VAE samples are shown.

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
    summation order differs between machines, so differences of a few thousandths of a bit need repeats.
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
    kl_warmup: int = 0  # steps over which beta rises linearly from 0 to 1 (0 = beta is 1 throughout)
    free_bits: float = 0.0  # lambda: floor in nats on each latent dimension's batch-mean KL (0 = off)
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


def mlp(d_in, d_out, hidden, layers, act):
    dims = [d_in] + [hidden] * layers
    blocks = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), ACTS[act]())]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], d_out))


class VAE(nn.Module):
    """Encoder q_phi(z|x) = N(mu, diag exp(logvar)), prior p(z) = N(0, I), decoder p_theta(x|z)."""

    def __init__(self, cfg, shape):
        super().__init__()
        self.shape, self.bernoulli, self.latent = tuple(shape), cfg.binarize, cfg.latent
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

    def encode(self, x):
        """x in [0, 1] -> mu, logvar of q(z|x), in fp32."""
        mu, logvar = self.enc(2 * x - 1).float().chunk(2, dim=-1)
        return mu, logvar

    def log_px_z(self, x, z):
        """log p_theta(x|z) summed over all sub-pixels, (B,), in fp32."""
        out = self.dec(z).float()
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        mean, log_scale = out.chunk(2, dim=1)
        return discretized_logistic_log_prob(2 * x - 1, mean, log_scale).flatten(1).sum(1)

    def mean_image(self, z):
        """The decoder's mean image in [0, 1]: Bernoulli probabilities or logistic locations."""
        out = self.dec(z).float()
        return torch.sigmoid(out) if self.bernoulli else ((out[:, : self.shape[0]] + 1) / 2).clamp(0, 1)

    def forward(self, x, beta=1.0, free_bits=0.0):  # the training loss, so that DDP sees one forward
        return negative_elbo(self, x, beta, free_bits)


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


# slide "Posterior collapse": weaken the KL term - anneal its weight beta (warm-up) or keep it >= delta
# per dimension (free bits, lambda); with beta = 1 and lambda = 0 the loss is exactly -ELBO.
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
    (dimensions with Cov_x(E_q[z_k]) > 0.01). fp32 throughout. Nats for binarized data, else bits/dim."""
    model.eval()
    log_px, nelbo, kl, mus = [], [], [], []
    for x in common.test_batches(data, cfg, run.device, 100, f"importance-sampled NLL (k = {cfg.eval_k}), -ELBO, KL, active units"):
        mu, logvar = model.encode(x)
        log_px.append(log_px_importance(x, mu, logvar, model.log_px_z, cfg.eval_k, chunk=max(1, 4000 // len(x))))
        e, kl_k = elbo(x, mu, logvar, model.log_px_z)
        nelbo.append(-e)
        kl.append(kl_k.sum(1))
        mus.append(mu)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    mus = torch.cat(mus)
    return common.eval_record(step, to_unit(-torch.cat(log_px).mean().item()), "nats" if cfg.binarize else "bpd", "estimate",
                              len(mus), k=cfg.eval_k, nelbo=to_unit(torch.cat(nelbo).mean().item()), nelbo_kind="bound",
                              kl_nats=torch.cat(kl).mean().item(), active_units=int((mus.var(0) > 0.01).sum()), latent=model.latent)


# ----------------------------------------------------------------------------- train
def train(cfg):
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"vae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = VAE(cfg, data.shape).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))  # for reconstructions and interpolations
    run.print(f"VAE ({cfg.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, K = {cfg.latent}, "
              f"{'Bernoulli' if cfg.binarize else 'discretized logistic'} likelihood)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            beta = min(1.0, (step + 1) / cfg.kl_warmup) if cfg.kl_warmup > 0 else 1.0  # KL warm-up
            with run.autocast():
                loss, terms = net(x, torch.full((), beta, device=run.device), cfg.free_bits)
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
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.0f} images/s, 1 decoder evaluation each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
