"""Very Deep VAE (VD-VAE): a top-down hierarchical VAE with dozens of stochastic layers.

Child, "Very Deep VAEs Generalize Autoregressive Models and Can Outperform Them on Images", arXiv 2011.10650
(official code: openai/vdvae). Slides: "Very Deep VAE (VD-VAE)".

A VAE with L stochastic layers z_1..z_L (coarse to fine resolutions) and the top-down factorisation
p(z) = prod_l p(z_l | z_<l), q(z|x) = prod_l q(z_l | z_<l, x), so that

    ELBO = E_q[log p(x|z)] - sum_l E_q[KL(q(z_l | z_<l, x) || p(z_l | z_<l))]      (one analytic KL per layer)
    decoder block l, state h at resolution r (the encoder's activation a_r at the same resolution):
        (mu_p, log sigma_p, h_p) = prior(h);  h <- h + h_p
        (mu_q, log sigma_q)     = posterior([h, a_r])
        z = mu_q + sigma_q eps  (training; sampling: z = mu_p + t sigma_p eps);  h <- h + W_z z;  h <- resblock(h)
A deep enough stack of such layers can express an autoregressive model over pixels (the slide's point), and it
keeps the VAE's parallel, one-pass sampling.
Every block is a bottleneck residual block GELU-conv1x1-GELU-conv3x3-GELU-conv3x3-GELU-conv1x1 (inner width
0.25 x width; 1x1 convolutions instead of the 3x3s at resolutions <= 2); the encoder average-pools between
resolutions; the decoder upsamples by nearest-neighbour interpolation between resolutions (no transposed
convolutions). Stability: the last convolution of every residual block and the z projection are scaled by
sqrt(1 / N) at initialisation (N = the number of blocks of that tower), the prior's last convolution starts at 0,
gradients are clipped at --grad-clip and an update whose gradient norm is at or above --skip-threshold (or not finite) is
skipped and counted (gradient skipping); evaluation uses an EMA of the weights.

Block strings, as the paper's configurations: "32x11" = 11 blocks at 32x32, "32d2" = a block that then average-pools
by 2, "8m4" = a decoder block at 8x8 that first adds the upsampled 4x4 state (the resolution change). Output: a
mixture of discretized logistics (PixelCNN++) over 8-bit pixels, a Bernoulli with --binarize. Test NLL: the
negative ELBO in bits/dim (bound; nats for binarized data), with the KL per resolution.

Differences from openai/vdvae: inputs 2x - 1 (the code standardises with the data set's mean and std); the
fashion preset's resolutions 1, 7, 14, 28 (the paper's are powers of 2; "7m1" upsamples by 7); bf16 autocast on
CUDA with the KLs and likelihood in fp32 (the code uses fp16 with its own loss scaling). Otherwise as hps.py and train.py: AdamW (beta2 0.9, weight decay 0.01), linear lr
warm-up, EMA 0.9999 (cifar10), clip 200, skip threshold 400, loss = the -ELBO per dimension.

Presets. `fashion-mnist`: a CPU demo, width 32, zdim 8, 27 stochastic layers, 25 of them at 7x7 and 14x14 (decoder
"1x1,7m1,7x9,14m7,14x14,28m14", encoder "28x2,28d2,14x3,14d2,7x3,7d7,1x2"), lr 1e-3, 2500 steps of 32, EMA 0.99
(with 0.999 the EMA still holds 0.999^2500 = 8% of the initial weights at the end: see the result below). `cifar10`: hps.py's cifar10
(width 384, zdim 16, the block strings in Config, lr 2e-4, weight decay 0.01, n_batch 16 per GPU, EMA 0.9999,
warm-up 100 steps, clip 200, skip threshold 400); the preset's global batch 32 and its 1M steps are not from the
paper or the code.

Run:
    python vdvae.py                                     # fashion-mnist demo
    python vdvae.py --dataset cifar10                   # hps.py's cifar10 configuration (a GPU)
    python vdvae.py --eval --ckpt runs/vdvae/fashion-mnist/ckpt.pt
    python vdvae.py --sample 64 --temperature 0.8 --ckpt runs/vdvae/fashion-mnist/ckpt.pt

Result (`python vdvae.py`: fashion-mnist preset, 0.21M parameters, 27 stochastic layers, 2500 steps of batch 32,
2 CPU cores, 3.2 it/s, 13 min 5 s wall with the evaluation; first 1000 test images):
    test -ELBO 3.428 bpd (bound; EMA 0.99 weights; the raw weights 3.455), 0 skipped updates;
    KL per resolution 1x1: 3.6, 7x7: 15.9, 14x14: 91.1, 28x28: 0.003 nats (the one 28x28 layer is unused).
    `--seed 1` (beside another job, one thread): 3.445 (raw 3.485), KL 2.4, 17.1, 88.3, 0.002 nats, 0 skipped.
    With EMA 0.999 the seed-0 run gave 3.928 (the EMA lags; training batches' -ELBO was 3.46 at the end).
    Samples (t = 1, 0.8) are blurry blobs at this size; --sample 64: 343.5 images/s (one top-down pass each).
    The cifar10 preset builds 39.1M parameters (the slide's table: 39M, depth 45, <= 2.87 bpd) and 43 stochastic
    layers (hps.py's decoder string has 43 blocks); not trained here (a GPU).
"""
import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "vdvae"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    width: int = 384  # channels of every block's input and output
    bottleneck: float = 0.25  # inner width of a block / width
    zdim: int = 16  # channels of z in each stochastic layer
    enc_blocks: str = "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3"  # encoder: RESxN, RESdK (pool by K after the block)
    dec_blocks: str = "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21"  # decoder: RESxN, RESmLOW (add the upsampled LOW state)
    mixtures: int = 10  # discretized logistic mixture components
    grad_clip: float = 200.0  # gradient norm clip
    skip_threshold: float = 400.0  # skip an update whose gradient norm is above this (0 = never skip a finite one)
    ema: float = 0.9999  # EMA rate of the weights (evaluation and samples use the EMA)
    warmup: int = 100  # linear lr warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    adam_beta2: float = 0.9  # Adam's beta2 (the code's 0.9)
    temperature: float = 1.0  # sampling: the prior std is scaled by this


PRESETS = {
    "fashion-mnist": dict(width=32, zdim=8, enc_blocks="28x2,28d2,14x3,14d2,7x3,7d7,1x2",
                          dec_blocks="1x1,7m1,7x9,14m7,14x14,28m14", mixtures=5, steps=2500, batch_size=32, lr=1e-3,
                          ema=0.99, warmup=100, log_every=100, ckpt_every=500, eval_n=1000),
    "cifar10": dict(width=384, zdim=16, enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
                    dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21", lr=2e-4, weight_decay=0.01, batch_size=32,
                    ema=0.9999, warmup=100, steps=1_000_000, log_every=1000, ckpt_every=10000, eval_every=50000, eval_n=2000),
}


def parse_blocks(s, kind):
    """'28x3,28d2,7m1' -> [(28, None), (28, None), (28, None), (28, 2), (7, 1)]; kind "enc" takes d, "dec" takes m."""
    out = []
    for part in s.split(","):
        m = re.fullmatch(r"(\d+)(?:x(\d+)|([dm])(\d+))?", part.strip())
        if not m or (m.group(3) and m.group(3) != {"enc": "d", "dec": "m"}[kind]):
            common.fail(f"--{kind}-blocks {s!r}: cannot read {part!r}; accepted: comma-separated RESxN, RES"
                        + ("dK (encoder)" if kind == "enc" else "mLOW (decoder)") + " or RES, e.g. "
                        + ("28x3,28d2,14x3" if kind == "enc" else "1x1,7m1,7x4"))
        res, n, _, k = m.groups()
        out += [(int(res), None)] * int(n) if n else [(int(res), int(k) if k else None)]
    return out


# ----------------------------------------------------------------------------- networks
def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Block(nn.Module):
    """Bottleneck residual block: GELU-conv1x1-GELU-conv3x3-GELU-conv3x3-GELU-conv1x1 (+ x if residual), then an
    optional average pooling by `down`; 1x1 convolutions in place of the 3x3s when use_3x3 is False."""

    def __init__(self, c_in, c_mid, c_out, residual=False, use_3x3=True, down=None, zero_last=False):
        super().__init__()
        k = 3 if use_3x3 else 1
        self.c1, self.c2 = nn.Conv2d(c_in, c_mid, 1), nn.Conv2d(c_mid, c_mid, k, padding=k // 2)
        self.c3, self.c4 = nn.Conv2d(c_mid, c_mid, k, padding=k // 2), nn.Conv2d(c_mid, c_out, 1)
        for c in (self.c1, self.c2, self.c3, self.c4):
            nn.init.zeros_(c.bias)  # the code's get_conv: zero biases
        if zero_last:
            nn.init.zeros_(self.c4.weight)
        self.residual, self.down = residual, down

    def forward(self, x):
        h = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        out = x + h if self.residual else h
        return F.avg_pool2d(out, self.down) if self.down else out


class DecBlock(nn.Module):
    """One stochastic layer of the top-down path (see the module docstring)."""

    def __init__(self, width, c_mid, zdim, res, mixin, n_blocks):
        super().__init__()
        self.res, self.mixin, self.zdim = res, mixin, zdim
        use_3x3 = res > 2
        self.enc = Block(2 * width, c_mid, 2 * zdim, use_3x3=use_3x3)  # q(z_l | z_<l, x) from [h, a_r]
        self.prior = Block(width, c_mid, 2 * zdim + width, use_3x3=use_3x3, zero_last=True)  # p(z_l | z_<l) and h_p
        self.z_proj = nn.Conv2d(zdim, width, 1)
        self.resnet = Block(width, c_mid, width, residual=True, use_3x3=use_3x3)
        with torch.no_grad():  # scaled-down initialisation: sqrt(1 / N) on the layers that write into the residual stream
            self.z_proj.weight.mul_(math.sqrt(1 / n_blocks)), nn.init.zeros_(self.z_proj.bias)
            self.resnet.c4.weight.mul_(math.sqrt(1 / n_blocks))

    def state(self, xs, ref):  # the decoder state at this resolution: the learned bias, + the upsampled lower state
        h = xs.get(self.res, ref)
        if self.mixin is not None:  # nearest-neighbour upsampling from the lower resolution
            h = h + F.interpolate(xs[self.mixin], scale_factor=self.res // self.mixin, mode="nearest")
        return h

    def forward(self, xs, acts, bias):
        h = self.state(xs, bias.expand(len(acts[self.res]), -1, -1, -1))
        pm, pv, hp = self.prior(h).split([self.zdim, self.zdim, h.shape[1]], 1)  # pv, qv: log sigma
        h = h + hp
        qm, qv = self.enc(torch.cat([h, acts[self.res]], 1)).chunk(2, 1)
        z = qm + qv.exp() * torch.randn_like(qm)  # reparameterization
        kl = gaussian_kl(up(qm), up(qv), up(pm), up(pv))  # (B, zdim, r, r)
        xs[self.res] = self.resnet(h + self.z_proj(z))
        return kl

    def forward_uncond(self, xs, bias, n, t):
        h = self.state(xs, bias.expand(n, -1, -1, -1))
        pm, pv, hp = self.prior(h).split([self.zdim, self.zdim, h.shape[1]], 1)
        z = pm + t * pv.exp() * torch.randn_like(pm)  # z ~ p(z_l | z_<l), std scaled by t
        xs[self.res] = self.resnet(h + hp + self.z_proj(z))


class VDVAE(nn.Module):
    def __init__(self, cfg, shape):
        super().__init__()
        C, H, W = self.shape = tuple(shape)
        self.bernoulli, self.M, width, c_mid = cfg.binarize, cfg.mixtures, cfg.width, max(1, int(cfg.width * cfg.bottleneck))
        enc, dec = parse_blocks(cfg.enc_blocks, "enc"), parse_blocks(cfg.dec_blocks, "dec")
        res, enc_res = H, [H]
        for r, down in enc:  # the resolutions the encoder visits must follow from H and the pooling factors
            if r != res:
                common.fail(f"--enc-blocks {cfg.enc_blocks!r}: a block at {r}x{r} where the resolution is {res}x{res}")
            if down:
                if res % down:
                    common.fail(f"--enc-blocks: {res}x{res} does not pool by {down}")
                res //= down
                enc_res.append(res)
        if H != W or set(r for r, _ in dec) - set(enc_res) or max(r for r, _ in dec) != H or dec[0][1] is not None:
            common.fail(f"--dec-blocks {cfg.dec_blocks!r}: needs square images, resolutions among the encoder's {enc_res} "
                        f"ending at {H}x{H}, and a first block without m")
        seen = set()
        for r, mixin in dec:
            if mixin is not None and (mixin not in seen or r % mixin):
                common.fail(f"--dec-blocks: {r}m{mixin} mixes in a resolution not decoded before it (or not a divisor)")
            seen.add(r)
        self.in_conv = nn.Conv2d(C, width, 3, padding=1)
        self.enc_blocks = nn.ModuleList([Block(width, c_mid, width, residual=True, use_3x3=r > 2, down=d) for r, d in enc])
        with torch.no_grad():
            for b in self.enc_blocks:
                b.c4.weight.mul_(math.sqrt(1 / len(enc)))
        self.dec_blocks = nn.ModuleList([DecBlock(width, c_mid, cfg.zdim, r, m, len(dec)) for r, m in dec])
        self.resolutions = sorted(seen)
        self.bias_xs = nn.ParameterDict({str(r): nn.Parameter(torch.zeros(1, width, r, r)) for r in self.resolutions})
        self.gain, self.bias = nn.Parameter(torch.ones(1, width, 1, 1)), nn.Parameter(torch.zeros(1, width, 1, 1))
        self.out = nn.Conv2d(width, C if self.bernoulli else (3 * self.M if C == 1 else 10 * self.M), 1)
        self.n_layers = len(dec)

    def encode(self, x):
        """The bottom-up activations a_r at every resolution r (the last block's output at r)."""
        h, acts = self.in_conv(2 * x - 1), {}
        acts[h.shape[2]] = h
        for block in self.enc_blocks:
            h = block(h)
            acts[h.shape[2]] = h
        return acts

    def forward(self, x):
        """-> likelihood parameters (B, n_out, H, W), the KL of each stochastic layer (list of (B, zdim, r, r))."""
        acts, xs, kls = self.encode(x), {}, []
        for block in self.dec_blocks:
            kls.append(block(xs, acts, self.bias_xs[str(block.res)]))
        return up(self.out(xs[self.shape[1]] * self.gain + self.bias)), kls

    def log_px_z(self, x, out):
        if self.bernoulli:
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        return disc_mix_logistic_log_prob(2 * x - 1, out, self.M).flatten(1).sum(1)

    def mean_image(self, out):
        """Bernoulli probabilities, or the mixture-weighted logistic locations (RGB coupled)."""
        if self.bernoulli:
            return torch.sigmoid(out)
        C, M = self.shape[0], self.M
        pi = torch.softmax(out[:, :M], 1)[:, None]  # (B, 1, M, H, W)
        p = out[:, M:].reshape(len(out), C, -1, *out.shape[2:])
        m = (p[:, :, :M] * pi).sum(2).clamp(-1, 1)  # (B, C, H, W)
        if C == 3:
            c = (torch.tanh(p[:, :, 2 * M:3 * M]) * pi).sum(2)
            m1 = (m[:, 1] + c[:, 0] * m[:, 0]).clamp(-1, 1)
            m = torch.stack([m[:, 0], m1, (m[:, 2] + c[:, 1] * m[:, 0] + c[:, 2] * m1).clamp(-1, 1)], 1)
        return (m + 1) / 2


# ----------------------------------------------------------------------------- objective
# KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per variable, from log sigmas (the code's gaussian_analytical_kl)
def gaussian_kl(mu_q, log_sig_q, mu_p, log_sig_p):
    return -0.5 + log_sig_p - log_sig_q + 0.5 * (torch.exp(2 * log_sig_q) + (mu_q - mu_p).pow(2)) * torch.exp(-2 * log_sig_p)


def disc_mix_logistic_log_prob(x, out, M):
    """log P(x) (B, H, W) of 8-bit x in [-1, 1] under a mixture of M discretized logistics (edges at -1 and 1);
    RGB: the means of G and B shift linearly with the sub-pixels before them (PixelCNN++)."""
    B, C, H, W = x.shape
    p = out[:, M:].reshape(B, C, -1, H, W)
    means, log_s = p[:, :, :M], p[:, :, M:2 * M].clamp(min=-7.0)  # (B, C, M, H, W)
    xe = x[:, :, None]
    if C == 3:
        c = torch.tanh(p[:, :, 2 * M:3 * M])
        means = torch.stack([means[:, 0], means[:, 1] + c[:, 0] * xe[:, 0], means[:, 2] + c[:, 1] * xe[:, 0] + c[:, 2] * xe[:, 1]], 1)
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (xe - means + 1 / 255), inv_s * (xe - means - 1 / 255)
    log_mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    log_p = torch.where(xe < -0.999, F.logsigmoid(plus), torch.where(xe > 0.999, F.logsigmoid(-minus), log_mid))
    return torch.logsumexp(log_p.sum(1) + F.log_softmax(out[:, :M], 1), 1)


# slide "VD-VAE": -ELBO = -log p(x|z) + sum_l KL_l, in nats per dimension as the code optimises it; net: the model or
# its DDP / compiled wrapper (the forward goes through it), model: the module itself
def vdvae_loss(net, model, x):
    out, kls = net(x)
    recon, rate = -model.log_px_z(x, out), sum(k.flatten(1).sum(1) for k in kls)  # (B,), (B,)
    loss = (recon + rate).mean() / math.prod(model.shape)
    terms = {"loss": loss, "recon": recon.mean(), "kl": rate.mean()}
    if not model.bernoulli:
        terms["bpd"] = loss / math.log(2)
    return loss, terms


class SkipUpdate:
    """VD-VAE's update: clip the gradient norm at `clip`; skip the step (optimizer and EMA untouched) when the norm
    before clipping is above `threshold` or anything is not finite; count the skips. On the device, without a host
    sync, for fused optimizers (the skip goes in as found_inf); else one host check per step."""

    def __init__(self, opt, model, ema, clip, threshold, device):
        self.opt, self.params, self.ema, self.clip, self.threshold = opt, [p for p in model.parameters() if p.requires_grad], ema, clip, threshold
        # skipped updates in all and in a row (common.Logger prints them, and calls check at every log line)
        self.skipped, self.streak, self.high = (torch.zeros((), device=device) for _ in range(3))
        self.ema_params = list(ema.model.parameters()) if ema else []

    def __call__(self, loss):
        if loss.requires_grad:
            loss.backward()
        norm = nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        skip = ~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)
        if self.threshold > 0:
            skip = skip | (norm >= self.threshold)  # (the code steps only when norm < threshold)
        skip = skip.float()
        if getattr(self.opt, "_step_supports_amp_scaling", False):
            self.opt.found_inf, self.opt.grad_scale = skip, None
            self.opt.step()
            del self.opt.found_inf, self.opt.grad_scale
        elif not skip.item():
            self.opt.step()
        if self.ema:  # theta_ema <- theta_ema + (1 - rate)(theta - theta_ema), not on skipped steps
            w = (1 - self.ema.decay) * (1 - skip)  # a device tensor: 0 on a skipped step
            with torch.no_grad():
                torch._foreach_mul_(self.ema_params, 1 - w)
                torch._foreach_add_(self.ema_params, torch._foreach_mul(self.params, w))
        self.skipped += skip
        self.streak = (self.streak + 1) * skip
        return norm

    def bound(self):  # (common.Logger's divergence bound: none here)
        return torch.full((), math.inf, device=self.skipped.device)

    def check(self, streak, high=0.0):
        if streak >= 20:
            common.fail(f"{int(streak)} updates in a row skipped (gradient norm above --skip-threshold {self.threshold:g} or not "
                        f"finite; {int(self.skipped.item())} in all); lower --lr or raise --skip-threshold")

    def state_dict(self):
        return {"skipped": self.skipped}

    def load_state_dict(self, s):
        self.skipped.copy_(s["skipped"])


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device, t=1.0):
    """One top-down pass: z_l ~ N(mu_p, (t sigma_p)^2) layer by layer, then the decoder's mean image."""
    xs = {}
    for block in model.dec_blocks:
        block.forward_uncond(xs, model.bias_xs[str(block.res)].to(device), n, t)
    return model.mean_image(up(model.out(xs[model.shape[1]] * model.gain + model.bias)))


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step, skipped=None):
    """Test -ELBO (a bound on the NLL; one z per example, analytic KLs), in fp32, with the KL per resolution."""
    model.eval()
    nelbo, kl_res, n = [], {}, 0
    for x in common.test_batches(data, cfg, run.device, 100, "-ELBO and the KL per resolution"):
        out, kls = model(x)
        nelbo.append(-model.log_px_z(x, out) + sum(k.flatten(1).sum(1) for k in kls))
        for block, k in zip(model.dec_blocks, kls):
            kl_res[block.res] = kl_res.get(block.res, 0) + k.flatten(1).sum(1).sum().item()
        n += len(x)
    model.train()
    to_unit = (lambda v: v) if cfg.binarize else (lambda v: common.bits_per_dim(v, math.prod(model.shape)))
    return common.eval_record(step, to_unit(torch.cat(nelbo).mean().item()), "nats" if cfg.binarize else "bpd", "bound", n,
                              kl_per_resolution={str(r): round(v / n, 3) for r, v in sorted(kl_res.items())},
                              stochastic_layers=model.n_layers, skipped_updates=skipped)


# ----------------------------------------------------------------------------- train
def save_images(model, x, cfg, out, step):
    for t in sorted({cfg.temperature, 0.8}):
        common.save_grid(sample(model, 64, x.device, t), out / f"samples_{step}_t{t:g}.png")
    model.eval()
    with torch.no_grad():
        rec = model.mean_image(model(x)[0])
    common.save_grid(torch.cat([x, rec]), out / f"recon_{step}.png", nrow=len(x))


def train(cfg):
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"vdvae.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    if cfg.width < 1 or cfg.zdim < 1 or cfg.mixtures < 1 or not 0 < cfg.bottleneck <= 1 or not 0 <= cfg.ema < 1 or cfg.warmup < 0 \
            or cfg.skip_threshold < 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0 or not 0 <= cfg.adam_beta2 < 1 or cfg.temperature < 0:
        common.fail("--width, --zdim, --mixtures >= 1, 0 < --bottleneck <= 1, 0 <= --ema, --adam-beta2 < 1 and --warmup, "
                    "--skip-threshold, --grad-clip, --weight-decay, --temperature >= 0 required")
    run = common.setup(cfg, METHOD)
    model = VDVAE(cfg, data.shape).to(run.device, memory_format=torch.channels_last)  # ~1.25x faster on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay, fused=run.fused)
    ema = common.EMA(model, cfg.ema, warmup=False)
    update = SkipUpdate(opt, model, ema, cfg.grad_clip, cfg.skip_threshold, run.device)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, ema=ema)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, 16))
    run.print(f"VD-VAE ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.n_layers} stochastic layers at "
              f"{model.resolutions}, {len(model.enc_blocks)} encoder blocks, "
              f"{'Bernoulli' if cfg.binarize else f'{cfg.mixtures}-logistic mixture'} output)")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, ema=ema,
                               shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            x = next(batches).contiguous(memory_format=torch.channels_last)
            with run.autocast():
                loss, terms = vdvae_loss(net, model, x)
            opt.zero_grad(set_to_none=True)
            norm = update(loss)
            step += 1
            log(step, terms | {"grad_norm": norm})  # (+ "skipped N" once there are any)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(ema.model, data, cfg, run, step, int(update.skipped.item())))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(ema.model, fixed, cfg, run.out, step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        save_images(ema.model, fixed, cfg, run.out, step)
        rec = evaluate(ema.model, data, cfg, run, step, int(update.skipped.item()))
        rec["test_nll_raw_weights"] = evaluate(model, data, cfg, run, step)["test_nll"]  # how far the EMA lags, if it does
        log.write(rec)
    return model, ema


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = VDVAE(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["ema"], cfg.ckpt)  # the EMA weights
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t0 = time.time()
        x = sample(model, cfg.sample, run.device, cfg.temperature).cpu()
        dt = time.time() - t0
        path = run.out / f"sample_t{cfg.temperature:g}.png"
        common.save_grid(x, path)
        print(f"{cfg.sample} samples at t = {cfg.temperature:g} in {dt:.3f}s ({cfg.sample / dt:.1f} images/s, one top-down pass each) -> {path}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"], ckpt["update"]["skipped"].item()))


if __name__ == "__main__":
    main()
