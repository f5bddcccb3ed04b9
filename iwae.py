"""Importance Weighted Autoencoder (IWAE): a tighter bound than the ELBO, from k samples of q(z|x).

Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", arXiv 1509.00519.
Slide: "Tighter bounds for variational inference" - "Importance weighted AE (IWAE)".

The generative model and the inference network are those of a VAE (vae.py); only the objective changes.
Jensen's inequality is applied to an average of k importance weights instead of to one:

    w_i = p(x, z_i) / q(z_i|x),  z_1..z_k ~ q(z|x)                       (importance weights)
    L_k = E[log 1/k sum_i w_i]  <=  log p(x)                             (the IWAE bound)
    L_1 = ELBO;  L_k <= L_{k+1};  L_k -> log p(x) as k -> infinity      (Burda et al., Theorem 1)
    grad L_k = E[sum_i w~_i grad log w_i],  w~_i = w_i / sum_j w_j       (what autograd of logsumexp gives)

`--objective vae` trains the paper's baseline instead: the k-sample ELBO 1/k sum_i log w_i (k = 1: a plain VAE).
With two stochastic layers (`--layers 2`), z = (h1, h2), q(z|x) = q(h1|x) q(h2|h1) and
p(x, z) = p(h2) p(h1|h2) p(x|h1), every conditional a diagonal Gaussian except p(x|h1).

Networks, as the paper (section 5) and its official code (yburda/iwae, experiments.py): 1 stochastic layer =
784-200-200-[h1 50] tanh and the mirror decoder; 2 stochastic layers = 784-200-200-[h1 100]-100-100-[h2 50] tanh
(q's hidden units [[200, 200], [100, 100]], p's the reverse); Glorot-uniform weights, zero biases, except, as the
official code, the Bernoulli output bias = logit of the mean training image (grey levels clipped to [0.001, 0.999])
and q(h1|x) reading the binary x itself (8-bit data: 2x - 1). Bernoulli p(x|h1) for binarized data (nats per image);
for 8-bit data the discretized logistic of vae.py (bits/dim). Test NLL: the k = 5000 importance-sampled estimate
log 1/5000 sum_i w_i (an estimate: its expectation is a lower bound on log p(x)); a unit u is active if
Cov_x(E_{u ~ q(u|x)}[u]) > 0.01. Batch 20, lr 1e-3 * 10^(-i/7) for 3^i epochs, i = 0..7 (3280 epochs).
Adam: the paper's text says beta1 = 0.9, beta2 = 0.999, eps = 1e-4; its official code (optimizers.py, train.py) uses
beta1 = 0.99, beta2 = 0.999 and adds eps = 1e-4 to sqrt(v) of the gradient of the loss summed over the batch of 20,
i.e. eps = 5e-6 on our batch-mean loss: the `mnist` preset does as the code (--adam-beta1 0.99 --adam-eps 5e-6).
Other differences from the official code: its v starts at 1, torch's at 0; it trains on the first 59600 images
(400 held out) in a fixed order, here on all 60000 reshuffled every epoch; q's Gaussians output (mean, log sigma),
here (mean, log variance).

Simplifications: none in the objective or the networks. `--lr-schedule paper` squeezes the paper's 8 stages
into --steps in the same proportions (exactly the paper at the `mnist` preset's 3280 epochs); short runs use
`--lr-schedule constant`. The `fashion-mnist` preset is a fast CPU run: one stochastic layer, ReLU MLPs 256
wide, 32 latents, 8-bit data, Adam (0.9, 0.999, 1e-4).

Run:
    python iwae.py                                                   # fashion-mnist, k = 5, 8-bit likelihood
    python iwae.py --dataset mnist --data-dir DIR --k 50 --layers 2  # the paper's run (3280 epochs)
    python iwae.py --dataset mnist --data-dir DIR --k 1 --objective vae   # its VAE baseline
    python iwae.py --eval --ckpt runs/iwae/mnist/ckpt.pt --eval-k 5000

Results (one thread each on 2 CPU cores, the other core busy; commands in README). Binarized MNIST, 1 stochastic
layer, the same 30000 steps of batch 20 for each (10 epochs), constant lr 1e-3, the mnist preset otherwise; test
NLL = k = 5000 estimate, first 1000 test images, in nats, seeds 0 / 1 (paper after 3280 epochs in brackets):
    VAE  k = 1   96.17 / 96.31  (-ELBO 105.12, 46/50 active units, seed 0)   [86.76]
    VAE  k = 5   93.45 / 93.75  (-ELBO 100.78, 21/50 active)                 [86.47]
    IWAE k = 5   94.40 / 94.28  (-ELBO 107.69, 49/50 active)                 [85.54]
    IWAE k = 50  93.80          (-ELBO 117.43, 50/50 active)                 [84.78]
  two stochastic layers (--layers 2), 15000 steps each, seed 0:
    VAE  k = 1   100.16  (-ELBO 110.71, 100/100 + 6/50 active)              [85.33]
    IWAE k = 50   97.52  (-ELBO 121.98, 100/100 + 8/50 active)              [82.90]
  Before the official output bias, binary input and Adam: 126.78, 119.00, 106.40, 105.35; two layers (then 100-50
  wide) 200.33 (collapsed) and 120.50.
`python iwae.py` (fashion-mnist, k = 5, 6000 steps, one thread, 988 s): test NLL 3.4905 bits/dim (k = 1000, first
1000 test images), k-sample -ELBO 3.6291 bits/dim, 32/32 active units (earlier, another machine: 3.492, 3.628).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "iwae"
PAPER_SIZES = {1: ([200], [50]), 2: ([200, 100], [100, 50])}  # layers -> (deterministic widths, stochastic sizes)


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    k: int = 5  # importance samples per example in training (1 = VAE)
    objective: str = common.choice("iwae", "vae")  # iwae: L_k = E log mean_i w_i; vae: E mean_i log w_i (k-sample ELBO)
    layers: int = 1  # stochastic layers: 1 or 2 (the paper's two architectures)
    hidden: str = ""  # deterministic width per stochastic layer, comma separated ('' = the paper's: 200 | 100,50)
    latent: str = ""  # size of each stochastic layer h1, h2 ('' = the paper's: 50 | 100,50)
    act: str = common.choice("tanh", "relu", "elu")  # activation of the deterministic layers (the paper: tanh)
    lr_schedule: str = common.choice("constant", "paper")  # paper: lr * 10^(-i/7) over stages of 3^i epochs, scaled to --steps (keep --steps on --resume)
    adam_beta1: float = 0.9  # Adam beta1 (the paper's text: 0.9; its official code: 0.99, the mnist preset)
    adam_eps: float = 1e-4  # Adam epsilon on the batch-mean loss (the paper: 1e-4; the official code's 1e-4 on the batch sum = 1e-4 / batch)
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    eval_k: int = 5000  # importance samples per test example for the NLL estimate (the paper: 5000)


PRESETS = {
    "fashion-mnist": dict(k=5, layers=1, hidden="256", latent="32", act="relu", steps=6000, batch_size=128,
                          lr=1e-3, log_every=500, ckpt_every=2000, eval_n=1000, eval_k=1000),
    "mnist": dict(binarize=True, k=50, layers=1, act="tanh", lr_schedule="paper", steps=3280 * 3000, batch_size=20,
                  lr=1e-3, adam_beta1=0.99, adam_eps=5e-6, log_every=3000, ckpt_every=30000, eval_every=300_000, eval_k=5000),
}


def sizes(cfg):
    """(deterministic widths, stochastic sizes) of the cfg.layers stochastic layers."""
    if cfg.layers not in PAPER_SIZES:
        common.fail(f"--layers {cfg.layers} unknown; accepted: 1, 2")
    try:
        widths = [int(v) for v in cfg.hidden.split(",")] if cfg.hidden else PAPER_SIZES[cfg.layers][0]
        latents = [int(v) for v in cfg.latent.split(",")] if cfg.latent else PAPER_SIZES[cfg.layers][1]
    except ValueError:
        common.fail(f"--hidden {cfg.hidden!r} / --latent {cfg.latent!r}: expected comma-separated integers")
    if len(widths) != cfg.layers or len(latents) != cfg.layers or min(widths + latents) < 1:
        common.fail(f"--hidden and --latent need {cfg.layers} positive integer(s) for --layers {cfg.layers}")
    return widths, latents


# ----------------------------------------------------------------------------- networks
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mlp(d_in, d_out, hidden, act):  # two deterministic layers, as every conditional of the paper
    return nn.Sequential(nn.Linear(d_in, hidden), ACTS[act](), nn.Linear(hidden, hidden), ACTS[act](), nn.Linear(hidden, d_out))


class IWAE(nn.Module):
    """q(z|x) = q(h1|x) [q(h2|h1)], p(x, z) = [p(h2) p(h1|h2)] p(x|h1), p(h_L) = N(0, I); Gaussians are diagonal."""

    def __init__(self, cfg, shape, train_mean=None):
        super().__init__()
        self.shape, self.bernoulli = tuple(shape), cfg.binarize
        widths, self.latents = sizes(cfg)
        D, self.n_out = math.prod(shape), 1 if cfg.binarize else 2  # Bernoulli logits | logistic (mean, log scale)
        below = [D] + self.latents[:-1]  # the variable under each stochastic layer: x, h1
        self.q = nn.ModuleList(mlp(d, 2 * s, w, cfg.act) for d, s, w in zip(below, self.latents, widths))
        out = [self.n_out * D] + [2 * d for d in below[1:]]  # p(x|h1) params, then p(h1|h2)'s mean and log-variance
        self.p = nn.ModuleList(mlp(s, o, w, cfg.act) for s, o, w in zip(self.latents, out, widths))
        for m in self.modules():  # the paper: weights by the heuristic of Glorot & Bengio (2010)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.bernoulli and train_mean is not None:  # official code: output bias = logit of the mean training image
            with torch.no_grad():
                self.p[0][-1].bias.copy_(torch.logit(train_mean.flatten().clamp(0.001, 0.999)))

    def inputs(self, x):  # what q(h1|x) sees: binary x itself (official code), 8-bit data as 2x - 1
        return x if self.bernoulli else 2 * x - 1

    def log_px_h1(self, x, h1):
        """log p(x|h1) summed over sub-pixels, fp32; x (B, D), h1 (..., B, K1) -> (..., B)."""
        out = up(self.p[0](h1))
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none").sum(-1)
        mean, log_scale = out.unflatten(-1, (2, -1)).unbind(-2)
        return discretized_logistic_log_prob(2 * x - 1, mean, log_scale).sum(-1)

    def log_weights(self, x, k):
        """log w_i = log p(x, z_i) - log q(z_i|x) for k samples: (k, B) in fp32; also the per-layer
        KL estimates log q - log p (k, B) and E_q[h_l] per example (for the active units)."""
        x = x.flatten(1)  # (B, D)
        below, log_q, means, hs = self.inputs(x)[None], [], [], []  # below: (1, B, D), then (k, B, K_l)
        for q in self.q:  # ancestral sampling from q: h1 ~ q(h1|x), h2 ~ q(h2|h1)
            mu, logvar = up(q(below)).expand(k, -1, -1).chunk(2, dim=-1)  # (k, B, K_l) each
            h = reparameterize(mu, logvar)
            log_q.append(log_normal(h, mu, logvar))
            means.append(mu.mean(0))  # E_q[h_l | x], averaged over the samples of the layer below
            hs.append(h)
            below = h
        log_p = [log_normal(hs[-1], torch.zeros_like(hs[-1]), torch.zeros_like(hs[-1]))]  # p(h_L) = N(0, I)
        for l in range(len(hs) - 1, 0, -1):  # p(h_{l-1} | h_l), top-down
            mu, logvar = up(self.p[l](hs[l])).chunk(2, dim=-1)
            log_p.insert(0, log_normal(hs[l - 1], mu, logvar))
        log_w = self.log_px_h1(x, hs[0]) + sum(log_p) - sum(log_q)  # (k, B)
        return log_w, [lq - lp for lq, lp in zip(log_q, log_p)], means

    @torch.no_grad()
    def mean_image(self, h1):
        out = up(self.p[0](h1))
        img = torch.sigmoid(out) if self.bernoulli else ((out[:, : out.shape[1] // 2] + 1) / 2).clamp(0, 1)
        return img.view(-1, *self.shape)

    def forward(self, x, k, objective):  # the training loss, so that DDP sees one forward
        return loss_fn(self, x, k, objective)


# ----------------------------------------------------------------------------- objective
# slide "VAE", reparameterization trick: z = mu + sigma * eps, eps ~ N(0, I)
def reparameterize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of 8-bit values x in [-1, 1] under a logistic discretized into the 256 bins, the edge bins
    extended to -inf / +inf (PixelCNN++, arXiv 1701.05517); log(sigmoid(a) - sigmoid(b)) in a stable form."""
    inv_s = torch.exp(-log_scale.clamp(min=-7.0))
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)  # the bin's edges, standardised
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    return torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), log_mid))


# slide "IWAE": L_k = E_{z_1..z_k ~ q(z|x)}[log 1/k sum_i p(x, z_i) / q(z_i|x)], as a logsumexp in fp32
def iwae_bound(log_w):
    """(k, B) log-weights -> (B,) one-sample estimates of L_k."""
    return torch.logsumexp(up(log_w), dim=0) - math.log(log_w.shape[0])


# slide "IWAE", by Jensen: ELBO = E_{z ~ q(z|x)}[log p(x, z) / q(z|x)], averaged over the k samples
def elbo(log_w):
    return up(log_w).mean(0)


def loss_fn(model, x, k, objective):
    """-L_k (iwae) or the k-sample -ELBO (vae), per example, with the terms the log shows."""
    log_w, kls, means = model.log_weights(x, k)
    bound = iwae_bound(log_w).mean()
    loss = -(bound if objective == "iwae" else elbo(log_w).mean())
    w_norm = torch.softmax(log_w.detach(), dim=0)  # w~_i: the weights each sample's gradient gets
    terms = {"loss": loss, "L_k": bound, "elbo": elbo(log_w).mean(),
             **{f"kl{l + 1}": kl.mean() for l, kl in enumerate(kls)},  # log q - log p per stochastic layer
             "ess": (1 / w_norm.pow(2).sum(0)).mean()}  # effective sample size of the k weights (1..k)
    if not model.bernoulli:
        terms["bpd"] = common.bits_per_dim(-bound, math.prod(model.shape))
    return loss, terms


# slide "IWAE" with k -> infinity: log p(x) ~= log 1/k sum_i w_i, the paper's k = 5000 test estimate
def log_px_importance(model, x, k, chunk):
    """(B,) estimates of log p(x), and the k-sample ELBO and E_q[h_l] per layer, from k samples in chunks."""
    log_w, means = [], []
    for i in range(0, k, chunk):
        lw, _, m = model.log_weights(x, min(chunk, k - i))
        log_w.append(lw)
        means.append([mi * len(lw) / k for mi in m])
    log_w = torch.cat(log_w)  # (k, B)
    return iwae_bound(log_w), elbo(log_w), [sum(m) for m in zip(*means)]


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device):
    """Ancestral sampling: h_L ~ N(0, I), h_{l-1} ~ p(h_{l-1}|h_l), then the mean image of p(x|h1)."""
    h = torch.randn(n, model.latents[-1], device=device, dtype=next(model.parameters()).dtype)
    for l in range(len(model.latents) - 1, 0, -1):
        h = reparameterize(*up(model.p[l](h)).chunk(2, dim=-1))
    return model.mean_image(h)


@torch.no_grad()
def reconstruct(model, x):
    """Decode the posterior mean of h1 (the mean image of p(x|h1 = E_q[h1]))."""
    return model.mean_image(up(model.q[0](model.inputs(x.flatten(1)))).chunk(2, dim=-1)[0])


def save_images(model, x, out, step):
    model.eval()
    common.save_grid(sample(model, 64, x.device), out / f"samples_{step}.png")
    common.save_grid(torch.cat([x, reconstruct(model, x)]), out / f"recon_{step}.png", nrow=len(x))  # top: data
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Test NLL estimated with cfg.eval_k importance samples (Burda et al.: 5000), the k-sample -ELBO (a bound)
    on the same samples, and the active units per stochastic layer (Cov_x(E_q[u]) > 0.01). fp32."""
    model.eval()
    log_px, elbos, means = [], [], []
    for x in common.test_batches(data, cfg, run.device, 100, f"importance-sampled NLL (k = {cfg.eval_k}), k-sample -ELBO, active units"):
        lp, e, m = log_px_importance(model, x, cfg.eval_k, chunk=max(1, 5000 // len(x)))
        log_px.append(lp)
        elbos.append(e)
        means.append(m)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    log_px = torch.cat(log_px)
    active = [int((torch.cat(m).var(0) > 0.01).sum()) for m in zip(*means)]  # (n_test, K_l) per layer
    return common.eval_record(step, to_unit(-log_px.mean().item()), "nats" if cfg.binarize else "bpd", "estimate",
                              len(log_px), k=cfg.eval_k, nelbo=to_unit(-torch.cat(elbos).mean().item()), nelbo_kind="bound",
                              active_units=sum(active), active_per_layer=active, latent=model.latents,
                              train_k=cfg.k, objective=cfg.objective)


# ----------------------------------------------------------------------------- train
def lr_at(cfg, step):
    """Burda et al.: lr * 10^(-i/7) during stage i = 0..7, which lasts 3^i of the 3280 epochs (scaled to --steps)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    epoch = step / cfg.steps * 3280
    i = next(i for i in range(8) if epoch < (3 ** (i + 1) - 1) / 2 or i == 7)  # stages end at epochs 1, 4, 13, ..., 3280
    return cfg.lr * 10 ** (-i / 7)


def train(cfg):
    for flag, v in (("--k", cfg.k), ("--eval-k", cfg.eval_k)):
        if v < 1:
            common.fail(f"{flag} {v} out of range; accepted: integers >= 1")
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"iwae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    train_mean = sum(b.float().sum(0) for b in data.train.split(4096)) / (255 * len(data.train)) if cfg.binarize else None
    model = IWAE(cfg, data.shape, train_mean).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), eps=cfg.adam_eps, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    run.print(f"{cfg.objective.upper()} (k = {cfg.k}, {len(model.latents)} stochastic layer(s) {model.latents}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{'Bernoulli' if cfg.binarize else 'discretized logistic'} likelihood)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            x = next(batches)
            with run.autocast():
                loss, terms = net(x, cfg.k, cfg.objective)
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
    model = IWAE(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t = time.time()
        x = sample(model, cfg.sample, run.device).cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.0f} images/s, 1 decoder pass each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
