"""Guided diffusion: classifier guidance, classifier-free guidance, and text as the condition (GLIDE).

Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233 (ADM); Ho & Salimans,
"Classifier-Free Diffusion Guidance", arXiv 2207.12598; Nichol et al., "GLIDE", arXiv 2112.10741.
Slides: "Diffusion Models Beat GANs on Image Synthesis" (classifier guided DDPM and DDIM sampling, the fidelity /
diversity trade-off), "Classifier-Free Diffusion Guidance" (the w table), "GLIDE" (how to input text as the condition).

One DDPM (x_0 in [-1, 1]) is trained on L_simple = ||eps - eps_theta(x_t, t, c)||^2 with the condition c (a label or a
caption) replaced by the null one with probability p_uncond: one network is eps_theta(z, c) and eps_theta(z) =
eps_theta(z, c = null). A classifier p_phi(y | x_t, t) is trained on noisy images. Sampling, g = grad_{x_t} log p_phi(y | x_t):
    classifier guidance, DDPM (ADM Algorithm 1):  x_{t-1} ~ N(mu + s Sigma g, Sigma)
    classifier guidance, DDIM (ADM Algorithm 2):  eps_hat = eps_theta(x_t) - sqrt(1 - alpha_bar_t) s g, then
        x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z, sigma_t = eta sqrt(beta_tilde_t)
    classifier-free guidance:  eps_tilde = (1 + w) eps_theta(z, c) - w eps_theta(z)   (both terms in one batched pass)
eps_theta(x_t) is the unconditional branch (`--base uncond`) or the conditional one (`--base cond`, ADM's guided conditional models).
With exact models s = 1 samples p(x | y) (Bayes: grad log p(x|y) = grad log p(x) + grad log p(y|x)); s > 1 sharpens it: fidelity up,
diversity down.
GLIDE at toy scale (`--cond text`): a caption from each label ("a photo of a sneaker", 4 templates), a fixed word vocabulary (0:
padding), a small transformer (token + position embeddings, a learned padding embedding, pre-LN blocks, final LayerNorm); the final
token's embedding, projected, is added to the time embedding in place of a class embedding, the token embeddings are projected to every
attention layer's keys and values and concatenated to its context; the null caption is the empty one, as GLIDE's.

As the official code (openai/guided-diffusion, openai/glide-text2im): g at the current x_t (the slide expands around mu); the
classifier gets the network timestep of a respaced step; the clipped x0_hat is turned back into eps before the guidance (ADM's
condition_score), not clipped again; the classifier is the U-Net's down path and middle with its own time embedding, then GroupNorm,
SiLU, average pooling (ADM's "adaptive" pool; its default: attention pooling) and a zero-initialised linear layer, trained on x_t, t ~
U{1..T}, by AdamW (lr 3e-4, weight decay 0.05, annealed to 0).
Differences from ADM: DDPM's U-Net (additive time embedding, not AdaGN; conv up/down), fixed sigma_t^2 = beta_t with L_simple (ADM:
learned Sigma, L_hybrid), GroupNorm groups halved below 4 channels per group (ADM: 32), the null label as one more row of the label
embedding; the sweep uses 25 DDIM steps ("ADM-G (25 steps)"; ADM's sweep: 250 DDPM steps).
Metrics (no likelihood: guidance changes the sampler, not the model; ddpm.py has the bound): held-out L_simple of both branches at the
same x_t and the noisy classifier's accuracy, by t quartile; the sweep (`--eval`; after `--stage all`): per kind and scale, `--sweep-n`
samples per class scored by common.classify (an independent classifier): FD, IS-like exp E KL(p(y|x) || p(y)), accuracy on the intended
class, precision / recall (Kynkaanniemi et al. 2019, k = 3, in the same features; ADM: VGG-16's), diversity = mean pairwise feature
distance within a class.
Presets: `fashion-mnist` (CPU) a 4x narrower U-Net than DDPM's CIFAR-10 model (32 channels, 1,2,2, attention at 7, 1 res block) and a
classifier of its shape (lr 1e-3 for its 1500 steps); `cifar10` (GPU) DDPM's CIFAR-10 U-Net + label embedding, p_uncond 0.1, ADM's
classifier recipe at width 128 (no guidance paper trained CIFAR-10). ImageNet 64x64: ADM used 192 channels, 1,2,3,4, 3 res blocks,
attention at 32,16,8, dropout 0.1, cosine schedule, learned sigmas, classifier scale 1.

Run:
    python guidance.py                                  # fashion-mnist: diffusion model, classifier, then the sweep
    python guidance.py --eval                           # the sweep again (FD, IS-like, accuracy, precision, recall, diversity)
    python guidance.py --sample 100 --guidance free --scale 2          # a row per class
    python guidance.py --cond text --stage diffusion --out runs/guidance/text && \
      python guidance.py --sample 16 --ckpt runs/guidance/text/ckpt.pt --prompt "a photo of a sneaker" --scale 3

Results (fashion-mnist, 2 CPU cores; README has the sweep tables):
    `python guidance.py`: 33 min 35 s wall; U-Net 1.11M at 0.48 s/step, classifier 0.44M; held-out L_simple cond 0.03927,
    uncond 0.04024; sweep (200 samples, DDIM 25): free w = 0 / 1 / 4: FD 52.53 / 32.25 / 55.48, accuracy 0.765 / 0.940 /
    0.990, recall 0.845 / 0.700 / 0.390; classifier s = 1 / 2 / 4: FD 34.55 / 30.52 / 32.76, accuracy 0.850 / 0.855 / 0.900.
    cifar10 preset: not yet measured.
"""
import math, os, sys, time
from dataclasses import dataclass, replace

import torch, torch.nn as nn, torch.nn.functional as F

import common

METHOD, CLASSIFIER = "guidance", "guidance-classifier"

# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    cond: str = common.choice("class", "text")  # the diffusion model's condition: the label, or a caption made from it (GLIDE)
    p_uncond: float = 0.1  # probability that a training condition is replaced by the null one (Ho & Salimans: 0.1 or 0.2)
    stage: str = common.choice("all", "diffusion", "classifier")  # what to train (all: diffusion model, classifier, then the sweep)
    T: int = 1000  # diffusion steps
    schedule: str = common.choice("linear", "cosine")  # beta schedule (Ho et al. linear; Nichol & Dhariwal cosine)
    beta_1: float = 1e-4  # linear schedule: first beta
    beta_T: float = 0.02  # linear schedule: last beta
    channels: int = 128  # U-Net base channels
    ch_mult: str = "1,2,2,2"  # channel multiplier per resolution level (U-Net and classifier)
    res_blocks: int = 2  # residual blocks per level
    attn_res: str = "16"  # resolutions with attention, comma separated ('' = none; the middle always has one)
    head_channels: int = 64  # channels per attention head (ADM: 64)
    dropout: float = 0.1  # dropout in the U-Net's residual blocks
    text_ctx: int = 8  # --cond text: tokens per caption
    text_width: int = 64  # --cond text: transformer width (GLIDE: 2048)
    text_layers: int = 2  # --cond text: transformer blocks (GLIDE: 24)
    text_heads: int = 4  # --cond text: attention heads (GLIDE: 32)
    warmup: int = 5000  # steps of linear learning-rate warm-up (diffusion model)
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    ema: float = 0.9999  # EMA decay of the diffusion weights used for sampling
    ema_warmup: bool = True  # EMA decay min(ema, (1 + t) / (10 + t)) at step t (ours; ADM: ema from step 1)
    hflip: bool = True  # random horizontal flips of training images
    cls_steps: int = 0  # classifier optimizer steps (0 = --steps)
    cls_lr: float = 3e-4  # classifier AdamW learning rate, annealed linearly to 0 (ADM)
    cls_weight_decay: float = 0.05  # classifier AdamW weight decay (ADM)
    cls_channels: int = 128  # classifier base channels (ADM: 128)
    cls_res_blocks: int = 2  # classifier residual blocks per level (ADM 128x128: 2)
    classifier_ckpt: str = ""  # classifier checkpoint (default classifier.pt beside --ckpt)
    guidance: str = common.choice("free", "classifier", "none")  # --sample: classifier-free (w), classifier (s), or none
    scale: float = 1.0  # --sample: the guidance scale, w (free) or s (classifier)
    base: str = common.choice("cond", "uncond")  # classifier guidance / none: guide eps_theta(x_t, y) or the unconditional eps_theta(x_t)
    sampler: str = common.choice("ddim", "ddpm")  # DDIM (ADM Algorithm 2) or ancestral DDPM (ADM Algorithm 1)
    sample_steps: int = 25  # sampling steps S (respaced; ADM-G: 25 DDIM steps, 250 DDPM steps)
    eta: float = 0.0  # DDIM: sigma_t = eta sqrt(beta_tilde_t) (0: deterministic)
    sigma: str = common.choice("beta", "beta_tilde")  # DDPM sampler: Sigma = beta_t (Ho's "fixedlarge") or beta_tilde_t
    clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] (ADM's samplers do)
    label: int = -1  # --sample: the class to draw (-1: a row per class); --class is accepted for it
    prompt: str = ""  # --sample with --cond text: the caption, e.g. "a photo of a sneaker"
    sweep_kinds: str = "free,classifier"  # --eval: guidance kinds swept (free, classifier, classifier-uncond)
    sweep_scales: str = "0,0.1,0.3,0.5,1,2,4"  # --eval: the scales w / s of the sweep
    sweep_n: int = 20  # --eval: samples per class and setting (0 = no sweep)
    grid: int = 10  # samples per class in each samples_<step>.png (a row per class)
    eval_batch: int = 250  # images per batch in evaluate and the sweep

PRESETS = {
    "cifar10": dict(channels=128, ch_mult="1,2,2,2", res_blocks=2, attn_res="16", dropout=0.1, lr=2e-4, batch_size=128,
                    warmup=5000, ema=0.9999, steps=800_000, cls_steps=300_000, cls_channels=128, cls_res_blocks=2,
                    log_every=1000, ckpt_every=10000, eval_n=10000, sweep_n=1000, eval_batch=500),
    "fashion-mnist": dict(channels=32, ch_mult="1,2,2", res_blocks=1, attn_res="7", dropout=0.1, lr=5e-4, batch_size=64,
                          warmup=200, ema=0.999, hflip=False, steps=3000, cls_steps=1500, cls_lr=1e-3, cls_channels=32,
                          cls_res_blocks=1, log_every=100, ckpt_every=500, eval_n=1000, sweep_n=20, eval_batch=250)}
KINDS = ("free", "classifier", "classifier-uncond")

def ints(s, kind=int):  # "1,2,2" -> [1, 2, 2]
    return [kind(v) for v in s.split(",") if v.strip()]

def resolve(cfg):
    for flag, v, lo in (("--T", cfg.T, 2), ("--channels", cfg.channels, 1), ("--res-blocks", cfg.res_blocks, 1),
                        ("--cls-channels", cfg.cls_channels, 1), ("--cls-res-blocks", cfg.cls_res_blocks, 1),
                        ("--head-channels", cfg.head_channels, 1), ("--sample-steps", cfg.sample_steps, 1),
                        ("--text-ctx", cfg.text_ctx, 1), ("--text-layers", cfg.text_layers, 0), ("--cls-steps", cfg.cls_steps, 0),
                        ("--sweep-n", cfg.sweep_n, 0), ("--grid", cfg.grid, 1), ("--eval-batch", cfg.eval_batch, 1)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    if cfg.sample_steps > cfg.T:
        common.fail(f"--sample-steps {cfg.sample_steps} out of range; accepted: 1..T ({cfg.T})")
    if not 0 <= cfg.p_uncond <= 1 or cfg.eta < 0 or not cfg.cls_lr > 0 or cfg.cls_weight_decay < 0:
        common.fail(f"--p-uncond {cfg.p_uncond} / --eta {cfg.eta} / --cls-lr {cfg.cls_lr} / --cls-weight-decay {cfg.cls_weight_decay} "
                    "out of range; accepted: 0 <= --p-uncond <= 1, --eta >= 0, --cls-lr > 0, --cls-weight-decay >= 0")
    if cfg.text_width < 1 or cfg.text_heads < 1 or cfg.text_width % cfg.text_heads:
        common.fail(f"--text-width {cfg.text_width} must be a positive multiple of --text-heads {cfg.text_heads}")
    try:
        ints(cfg.ch_mult), ints(cfg.attn_res), ints(cfg.sweep_scales, float)
    except ValueError:
        common.fail(f"--ch-mult {cfg.ch_mult!r} / --attn-res {cfg.attn_res!r} / --sweep-scales {cfg.sweep_scales!r}: expected comma-separated numbers")
    bad = [k for k in cfg.sweep_kinds.split(",") if k not in KINDS]
    if bad or not cfg.sweep_kinds:
        common.fail(f"--sweep-kinds {cfg.sweep_kinds!r}: {bad[0] if bad else 'empty'} unknown; accepted: a comma-separated list of {', '.join(KINDS)}")
    if cfg.prompt and cfg.cond != "text":
        common.fail("--prompt needs a text-conditional model (--cond text)")
    return cfg

# ----------------------------------------------------------------------------- captions (GLIDE at toy scale)
NAMES = {"fashion-mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
         "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
         "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")}
TEMPLATES = ("a photo of {}", "a picture of {}", "an image of {}", "{}")

def caption(name, template=0):  # "a photo of a sneaker", "an image of an ankle boot"
    return TEMPLATES[template].format(("an " if name[0] in "aeiou" else "a ") + name)

class Captions:
    """A fixed word vocabulary (index 0: padding, then the words of every template and class name, sorted) and the
    tokenized captions of every class and template, `table` (K, templates, ctx). The empty caption is the null condition."""
    def __init__(self, names, ctx):
        words = sorted({w for n in names for j in range(len(TEMPLATES)) for w in caption(n, j).split()})
        self.vocab, self.ctx = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(words)}}, ctx
        self.table = torch.stack([torch.stack([self.encode(caption(n, j)) for j in range(len(TEMPLATES))]) for n in names])
    def encode(self, text):
        words = text.lower().split()
        if unknown := [w for w in words if w not in self.vocab or w == "<pad>"]:
            common.fail(f"caption {text!r}: the word {unknown[0]!r} is not in the vocabulary; accepted words: "
                        + ", ".join(w for w in self.vocab if w != "<pad>"))
        if len(words) > self.ctx:
            common.fail(f"caption {text!r} has {len(words)} words; --text-ctx {self.ctx} holds at most {self.ctx}")
        return torch.tensor([self.vocab[w] for w in words] + [0] * (self.ctx - len(words)))

class Conditions:
    """What the diffusion model is conditioned on: the label (null: the extra label n_classes), or a caption made from it
    (null: the empty caption, all padding). of(labels) -> the condition of each label, its first template's caption or
    (templates (B,)) the given ones."""
    def __init__(self, cfg, data_name, n_classes, device):
        self.n_classes, self.text = n_classes, cfg.cond == "text"
        self.captions = Captions(NAMES[data_name], cfg.text_ctx) if self.text else None
        self.null = torch.zeros(cfg.text_ctx, dtype=torch.long, device=device) if self.text else torch.tensor(n_classes, device=device)
        self.table, self.vocab = (self.captions.table.to(device), len(self.captions.vocab)) if self.text else (None, 0)
    def of(self, labels, templates=None):
        return self.table[labels, torch.zeros_like(labels) if templates is None else templates] if self.text else labels

# ----------------------------------------------------------------------------- schedule
class Schedule(nn.Module):
    """The constants of the S sampling indices i = 1..S (index 0: x_0, alpha_bar = 1) at the network timesteps `steps`,
    computed in fp64 from alpha_bar and stored in fp32 (no 1 - alpha_bar from a stored alpha_bar near 1). S = T: every
    step, index = timestep; S < T: respaced (Nichol & Dhariwal sec. 4), beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
    def __init__(self, alpha_bar, steps):
        super().__init__()
        ab = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar.double()])  # (S + 1,)
        prev = torch.cat([ab[:1], ab[:-1]])  # alpha_bar_{i-1}
        betas, div = 1 - ab / prev, (1 - ab).clamp_min(1e-20)
        beta_tilde = (1 - prev) / div * betas  # beta_tilde_i = (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i) beta_i
        reg = lambda name, v: self.register_buffer(name, v.float(), persistent=False)
        reg("sqrt_alpha_bar", ab.sqrt()), reg("sqrt_one_minus_alpha_bar", (1 - ab).sqrt())
        reg("sqrt_recip_alpha_bar", ab.rsqrt()), reg("sqrt_recipm1_alpha_bar", ((1 - ab) / ab).sqrt())  # sqrt(1 - alpha_bar) / sqrt(alpha_bar)
        reg("sqrt_alpha_bar_prev", prev.sqrt()), reg("one_minus_alpha_bar_prev", 1 - prev), reg("beta_tilde", beta_tilde)
        reg("var_beta", torch.cat([betas[:1], beta_tilde[2:3] if len(ab) > 2 else betas[1:2], betas[2:]]))  # beta, beta_tilde_2 at i = 1
        reg("coef_x0", prev.sqrt() * betas / div), reg("coef_xt", (1 - betas).sqrt() * (1 - prev) / div)  # mu_tilde = coef_x0 x_0 + coef_xt x_t
        self.register_buffer("steps", torch.cat([torch.zeros(1, dtype=torch.long), steps.long()]), persistent=False)
        self.S = len(steps)

def make_schedule(cfg, S=None):
    """Ho et al.'s linear betas (or the cosine alpha_bar of Nichol & Dhariwal eq. 17), alpha_bar in fp64, on S of the T steps."""
    if cfg.schedule == "cosine":
        f = torch.cos((torch.arange(cfg.T + 1, dtype=torch.float64) / cfg.T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        betas = torch.linspace(cfg.beta_1, cfg.beta_T, cfg.T, dtype=torch.float64)
    alpha_bar, S = torch.cumprod(1 - betas, 0), S or cfg.T
    t = torch.linspace(1, cfg.T, S, dtype=torch.float64).round().long() if S > 1 else torch.tensor([cfg.T])
    return Schedule(alpha_bar[t - 1], t)

def at(v, i):  # a schedule vector at indices i (B,), shaped to broadcast over (B, C, H, W)
    return v[i][:, None, None, None]

# ----------------------------------------------------------------------------- networks
def norm(c):
    """GroupNorm with 32 groups (DDPM, ADM), halved until each group has >= 4 channels: with 1 channel per group the norm
    would subtract every per-channel offset, the added time and condition embedding among them (32 channels, 32 groups)."""
    g = math.gcd(32, c)
    while g > 1 and c // g < 4:
        g //= 2
    return nn.GroupNorm(g, c)

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], 1)

class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the projected (time + condition) embedding; GroupNorm, SiLU, dropout, conv; + skip."""
    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.block1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.temb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))
        self.block2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.block2[-1].weight)  # the block starts as its skip path
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
    def forward(self, x, emb):
        h = self.block1(x) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)

class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. With ctx_dim (slide "GLIDE"): the caption's token
    embeddings are projected to this layer's keys and values and concatenated to the attention context."""
    def __init__(self, c, head_channels, ctx_dim=0):
        super().__init__()
        self.heads = max(1, c // head_channels) if c % head_channels == 0 else 1
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        self.ctx_kv = nn.Linear(ctx_dim, 2 * c) if ctx_dim else None
        nn.init.zeros_(self.proj.weight)
    def forward(self, x, ctx=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        if self.ctx_kv is not None:
            ek, ev = self.ctx_kv(ctx).chunk(2, dim=-1)  # (B, K, C) each: the tokens' keys and values
            k, v = torch.cat([ek, k], 1), torch.cat([ev, v], 1)  # (B, K + HW, C)
        split = lambda z: z.view(B, z.shape[1], self.heads, C // self.heads).transpose(1, 2)  # (B, heads, L, C / heads)
        h = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))

class Encoder(nn.Module):
    """The U-Net's down path and middle: conv, res blocks (+ attention at attn_res) per level, stride-2 convs between
    levels, then res block, attention, res block. Returns the middle's output and every skip (the classifier's trunk too)."""
    def __init__(self, C, H, ch, mult, nb, attn, t_dim, dropout, head_ch, ctx_dim=0):
        super().__init__()
        self.conv_in = nn.Conv2d(C, ch, 3, padding=1)
        self.down, self.skips, c, res = nn.ModuleList(), [ch], ch, H
        for i, m in enumerate(mult):
            for _ in range(nb):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, t_dim, dropout)] + ([Attention(ch * m, head_ch, ctx_dim)] if res in attn else [])))
                self.skips.append(c := ch * m)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # (B, c, ceil(res/2), ...)
                res = (res + 1) // 2
                self.skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout), Attention(c, head_ch, ctx_dim), ResBlock(c, c, t_dim, dropout)])
        self.c, self.res = c, res
    def forward(self, x, emb, ctx=None):
        hs = [self.conv_in(x)]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                hs.append(layer(hs[-1]))
            else:
                h = layer[0](hs[-1], emb)
                hs.append(layer[1](h, ctx) if len(layer) > 1 else h)
        return self.mid[2](self.mid[1](self.mid[0](hs[-1], emb), ctx), emb), hs

class TextEncoder(nn.Module):
    """slide "GLIDE": tokens -> a transformer; the final token's embedding (projected) replaces the class embedding, the
    last layer's token embeddings are the attention context. Blocks as GLIDE's (CLIP's): pre-LN, full self-attention,
    a 4x MLP with GELU, a final LayerNorm. tokens (B, K) -> (B, t_dim), (B, K, width)."""
    def __init__(self, vocab, ctx, width, layers, heads, t_dim):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos, self.pad = (nn.Parameter(0.01 * torch.randn(ctx, width)) for _ in range(2))  # GLIDE: xf_padding
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False) if layers else nn.Identity()
        self.ln, self.proj = nn.LayerNorm(width), nn.Linear(width, t_dim)
    def forward(self, tokens):
        h = torch.where((tokens > 0)[..., None], self.tok(tokens) + self.pos, self.pad)  # (B, K, width); padding: its own embedding
        h = self.ln(self.blocks(h))
        return self.proj(h[:, -1]), h

class UNet(nn.Module):
    """eps_theta(x_t, t, c): the DDPM U-Net (Ho et al. appendix B) with the condition's embedding added to the time
    embedding: a label embedding with one more row (index n_classes) for the null label, or the caption encoder's."""
    def __init__(self, cfg, shape, n_classes, vocab=0):
        super().__init__()
        C, H, _ = shape
        ch, mult, attn, nb = cfg.channels, ints(cfg.ch_mult), set(ints(cfg.attn_res)), cfg.res_blocks
        self.ch, t_dim, self.text = ch, 4 * ch, cfg.cond == "text"
        self.temb = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        if self.text:
            self.caption = TextEncoder(vocab, cfg.text_ctx, cfg.text_width, cfg.text_layers, cfg.text_heads, t_dim)
        else:
            self.label_emb = nn.Embedding(n_classes + 1, t_dim)  # row n_classes: the null label
        self.enc = Encoder(C, H, ch, mult, nb, attn, t_dim, cfg.dropout, cfg.head_channels, cfg.text_width if self.text else 0)
        skips, c, res = list(self.enc.skips), self.enc.c, self.enc.res
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(nb + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch * m, t_dim, cfg.dropout)]
                                             + ([Attention(ch * m, cfg.head_channels, cfg.text_width if self.text else 0)] if res in attn else [])))
                c = ch * m
            if i > 0:
                self.up.append(nn.Conv2d(c, c, 3, padding=1))  # after a nearest-neighbour x2 upsampling
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, C, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
    def forward(self, x, t, c):
        """x_t (B, C, H, W), integer t (B,), c: labels (B,) or caption tokens (B, K) -> eps_theta (B, C, H, W)."""
        proj, ctx = self.caption(c) if self.text else (self.label_emb(c), None)  # (the caption's projection and its tokens)
        emb = self.temb(timestep_embedding(t, self.ch)) + proj
        h, hs = self.enc(x, emb, ctx)
        for layer in self.up:
            if isinstance(layer, nn.Conv2d):
                h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # odd sides (7 -> 4 -> 8) are cropped below
            else:
                skip = hs.pop()
                h = layer[0](torch.cat([h[..., : skip.shape[-2], : skip.shape[-1]], skip], 1), emb)
                h = layer[1](h, ctx) if len(layer) > 1 else h
        return self.out(h)

class Classifier(nn.Module):
    """p_phi(y | x_t, t) (ADM sec. 4): the U-Net's down path and middle with its own time embedding, then GroupNorm,
    SiLU, global average pooling and a zero-initialised linear layer to the logits."""
    def __init__(self, cfg, shape, n_classes):
        super().__init__()
        C, H, _ = shape
        self.ch, t_dim = cfg.cls_channels, 4 * cfg.cls_channels
        self.temb = nn.Sequential(nn.Linear(self.ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.enc = Encoder(C, H, self.ch, ints(cfg.ch_mult), cfg.cls_res_blocks, set(ints(cfg.attn_res)), t_dim, 0.0, cfg.head_channels)
        self.head = nn.Sequential(norm(self.enc.c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.enc.c, n_classes))
        nn.init.zeros_(self.head[-1].weight)
    def forward(self, x, t):
        return self.head(self.enc(x, self.temb(timestep_embedding(t, self.ch)))[0])  # (B, n_classes) logits

# ----------------------------------------------------------------------------- objective
# slide "DDPM": x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
def q_sample(sched, x0, i, eps):
    return at(sched.sqrt_alpha_bar, i) * x0 + at(sched.sqrt_one_minus_alpha_bar, i) * eps

def drop_condition(c, null, drop):
    """Ho & Salimans Algorithm 1: c <- null where drop (B,) is True; labels (B,) or tokens (B, K)."""
    return torch.where(drop.view(-1, *[1] * (c.dim() - 1)), null.to(c), c)

def loss_fn(net, sched, x, c, null, p_uncond):
    """Ho & Salimans Algorithm 1 (joint training): c dropped to null with probability p_uncond, then L_simple =
    ||eps - eps_theta(x_t, t, c)||^2 (mean over dimensions) at t ~ U{1..T}. x in [0, 1] -> (loss, terms)."""
    x0 = 2 * x - 1
    t = torch.randint(1, sched.S + 1, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    drop = torch.rand(len(x0), device=x0.device) < p_uncond
    out = net(q_sample(sched, x0, t, eps), t, drop_condition(c, null, drop)).float()
    per = (eps - out).pow(2).flatten(1).mean(1)
    loss = per.mean()
    return loss, {"loss": loss, "null_frac": drop.float().mean(), **by_quartile(per.detach(), t, sched.S, "loss")}

def by_quartile(v, t, T, name):  # the mean of v (B,) in each quarter of 1..T (NaN where none: the Logger skips it)
    q = (t - 1) * 4 // T
    sums, counts = (torch.zeros(4, device=v.device).scatter_add(0, q, w) for w in (v.float(), torch.ones_like(v, dtype=torch.float)))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)
    return {f"{name}_q{k}": means[k] for k in range(4)}

# ADM sec. 4: the classifier is trained on noisy images x_t ~ q(x_t|x_0), t ~ U{1..T}, by cross-entropy
def classifier_loss(net, sched, x, y):
    x0 = 2 * x - 1
    t = torch.randint(1, sched.S + 1, (len(x0),), device=x0.device)
    logits = net(q_sample(sched, x0, t, torch.randn_like(x0)), t).float()
    per = F.cross_entropy(logits, y, reduction="none")
    correct = (logits.argmax(1) == y).float()
    loss = per.mean()
    return loss, {"loss": loss, "acc": correct.mean(), **by_quartile(correct, t, sched.S, "acc")}

# ----------------------------------------------------------------------------- sampling
# slide "Classifier guided diffusion sampling": g = grad_{x_t} log p_phi(y | x_t) (autograd through the classifier)
def classifier_grad(classifier, x_t, t, y):
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_p = classifier(x, t).float().log_softmax(-1)  # (B, K), fp32
        return torch.autograd.grad(log_p.gather(1, y[:, None]).sum(), x)[0].float()

# slide "Classifier-Free Diffusion Guidance": eps_tilde = (1 + w) eps_theta(z, c) - w eps_theta(z), one batched forward pass
def cfg_eps(model, x_t, t, c, null, w):
    if w == 0:  # the conditional model itself (half the cost)
        return model(x_t, t, c).float()
    e_c, e_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, null.to(c).expand_as(c)])).float().chunk(2)
    return (1 + w) * e_c - w * e_u

# slide "Classifier guided DDIM sampling": eps_hat = eps_theta(x_t) - sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t), times s
def guided_eps(sched, i, eps, g, s):
    return eps - at(sched.sqrt_one_minus_alpha_bar, i) * s * g

# slide "Classifier guided diffusion sampling": p(x_t | x_{t+1}, y) ~ N(mu + s Sigma g, Sigma)
def guided_mean(mean, var, g, s):
    return mean + s * var * g

@torch.no_grad()
def sample(model, sched, shape, c, null, w=0.0, classifier=None, y=None, s=0.0, sampler="ddim", eta=0.0, sigma="beta", clip_x0=True):
    """Guided sampling from x_S ~ N(0, I) over the (respaced) schedule: eps from cfg_eps (w = 0: eps_theta(x_t, c);
    c = null: the unconditional model); with s != 0 the classifier's g = grad log p_phi(y | x_t) enters as ADM
    Algorithm 1 (sampler ddpm: mean shift s Sigma g, no noise at the last step) or Algorithm 2 (sampler ddim: eps_hat,
    sigma_t = eta sqrt(beta_tilde_t), no noise at the last step since alpha_bar_0 = 1). Returns images in [0, 1]."""
    n, device = len(c), sched.sqrt_alpha_bar.device
    x = torch.randn(n, *shape, device=device)
    for k in range(sched.S, 0, -1):
        i = torch.full((n,), k, device=device, dtype=torch.long)
        t = sched.steps[i]  # the network's timestep of index k
        x0_hat = lambda eps: at(sched.sqrt_recip_alpha_bar, i) * x - at(sched.sqrt_recipm1_alpha_bar, i) * eps  # (x_t - sqrt(1 - ab) eps) / sqrt(ab)
        eps = cfg_eps(model, x, t, c, null, w)
        if clip_x0:  # x0_hat clipped, and eps recomputed from it (ADM)
            eps = (at(sched.sqrt_recip_alpha_bar, i) * x - x0_hat(eps).clamp(-1, 1)) / at(sched.sqrt_recipm1_alpha_bar, i)
        g = classifier_grad(classifier, x, t, y) if s != 0 else None
        if sampler == "ddim":
            eps = guided_eps(sched, i, eps, g, s) if s != 0 else eps
            sig = eta * at(sched.beta_tilde, i).sqrt()
            x = (at(sched.sqrt_alpha_bar_prev, i) * x0_hat(eps) + (at(sched.one_minus_alpha_bar_prev, i) - sig ** 2).clamp_min(0).sqrt() * eps
                 + (sig * torch.randn_like(x) if eta > 0 and k > 1 else 0))
        else:
            mean = at(sched.coef_x0, i) * x0_hat(eps) + at(sched.coef_xt, i) * x  # mu_theta(x_t) = mu_tilde(x_t, x0_hat)
            var = at(sched.var_beta if sigma == "beta" else sched.beta_tilde, i)
            mean = guided_mean(mean, var, g, s) if s != 0 else mean
            x = mean + var.sqrt() * torch.randn_like(x) if k > 1 else mean
    return ((x + 1) / 2).clamp(0, 1)

def guided_sample(model, classifier, sched, shape, labels, kind, scale, cfg, conds, run, c=None):
    """Samples of the labels (B,) under one guidance kind: free (w = scale), classifier (s = scale on the conditional
    model), classifier-uncond (s = scale on the unconditional model), none (cfg.base), in batches of cfg.eval_batch."""
    out = []
    for yb in labels.to(run.device).split(cfg.eval_batch):
        cb, null = conds.of(yb) if c is None else c.expand(len(yb), *c.shape[1:]), conds.null  # c: a prompt's tokens
        uncond = kind == "classifier-uncond" or kind in ("classifier", "none") and cfg.base == "uncond"
        cb = null.expand_as(cb) if uncond else cb  # the unconditional model: the null condition
        w, s = (scale, 0.0) if kind == "free" else (0.0, scale if kind.startswith("classifier") else 0.0)
        if s != 0 and classifier is None:
            common.fail(f"classifier guidance needs a trained classifier; none at {classifier_path(cfg)} (run --stage classifier)")
        with run.autocast():
            out.append(sample(model, sched, shape, cb, null, w, classifier, yb, s, cfg.sampler, cfg.eta, cfg.sigma, cfg.clip_x0))
    return torch.cat(out)

# ----------------------------------------------------------------------------- evaluate
def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019: precision = the fraction of samples inside the real manifold (the union of balls around each
    real feature reaching its k-th nearest real neighbour), recall = the fraction of real features inside the samples'."""
    radius = lambda f: torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # (the distance 0 to itself is the first)
    d = torch.cdist(fake, real)  # (N_fake, N_real)
    return (d <= radius(real)[None]).any(1).double().mean().item(), (d.T <= radius(fake)[None]).any(1).double().mean().item()

def inception_like_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean p(y|x) of the samples (Salimans et al. 2016, one split), in common.classify's
    classes (not Inception-v3's): 1 <= score <= the number of classes."""
    log_p = logits.double().log_softmax(1)
    return math.exp((log_p.exp() * (log_p - log_p.exp().mean(0).log())).sum(1).mean().item())

def within_class_distance(f, labels):
    """Diversity: the mean pairwise feature distance between two different samples of the same class, averaged over classes."""
    means = [torch.pdist(f[labels == y]).mean().item() for y in labels.unique() if (labels == y).sum() > 1]
    return sum(means) / max(len(means), 1)

@torch.no_grad()
def evaluate(model, classifier, data, cfg, run, step):
    """Held-out numbers at the same x_t, t, eps for every test image (seeded): L_simple of the conditional branch and of the
    unconditional one (their gap: what the condition tells the model), and the noisy classifier's accuracy, by t quartile."""
    sched, conds = make_schedule(cfg).to(run.device), Conditions(cfg, data.name, int(data.train_labels.max()) + 1, run.device)
    n, gen = len(data.test[:cfg.eval_n or None]), torch.Generator().manual_seed(0)
    rows = []  # (t, mse_cond, mse_uncond, correct) per example
    for start in common.progress(range(0, n, cfg.eval_batch), f"evaluate: held-out losses on {n} test images"):
        x0 = (data.test[start:min(start + cfg.eval_batch, n)].float() / 255 * 2 - 1).to(run.device)
        y = data.test_labels[start:start + len(x0)].to(run.device)
        t = torch.randint(1, cfg.T + 1, (len(x0),), generator=gen).to(run.device)
        x_t = q_sample(sched, x0, t, eps := torch.randn(x0.shape, generator=gen).to(run.device))
        c = conds.of(y)
        with run.autocast():
            mse = [(cfg_eps(model, x_t, t, cc, conds.null, 0.0) - eps).pow(2).flatten(1).mean(1) for cc in (c, conds.null.expand_as(c))]
            correct = (classifier(x_t, t).argmax(1) == y).float() if classifier is not None else torch.full_like(mse[0], math.nan)
        rows.append(torch.stack([t.float(), *mse, correct], 1))
    t, *values = torch.cat(rows).T
    extras = {}
    for name, v in zip(("mse_cond", "mse_uncond", "cls_accuracy"), values):
        extras.update({name: v.mean().item(), **{k: q.item() for k, q in by_quartile(v, t.long(), cfg.T, name).items()}})
    return common.eval_record(step, None, "bpd", None, n, **extras)

@torch.no_grad()
def sweep(model, classifier, data, cfg, run, step, log):
    """The slides' trade-off: for each guidance kind and scale, cfg.sweep_n samples per class (the same x_T for every
    setting), scored by common's independent classifier; a record per setting in metrics.jsonl, sweep_<kind>_<scale>.png
    (a row per class), and the table sweep.md."""
    n_classes = int(data.train_labels.max()) + 1
    conds = Conditions(cfg, data.name, n_classes, run.device)
    labels = torch.arange(n_classes).repeat_interleave(cfg.sweep_n)
    n = min(len(labels), len(data.test))
    f_real, _ = common.classify(data.test[:n].float() / 255, data, cfg, run)
    div_real = within_class_distance(f_real, data.test_labels[:n])
    sched, table = make_schedule(cfg, cfg.sample_steps).to(run.device), []
    for kind in cfg.sweep_kinds.split(","):
        if kind.startswith("classifier") and classifier is None:
            run.print(f"sweep: no classifier at {classifier_path(cfg)}; {kind} guidance skipped (run --stage classifier)")
            continue
        for scale in ints(cfg.sweep_scales, float):
            t0 = time.time()
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed + 1)  # the same x_T and noise in every setting
                x = guided_sample(model, classifier, sched, data.shape, labels, kind, scale, cfg, conds, run).cpu()
            dt = time.time() - t0
            f, logits = common.classify(x, data, cfg, run)
            precision, recall = precision_recall(f_real, f[:n])
            passes = cfg.sample_steps * (2 if kind == "free" and scale != 0 else 1)
            rec = common.eval_record(step, None, "bpd", None, n, guidance=kind, scale=scale,
                                     fd=common.frechet_distance(x, data, cfg, run, n), fd_kind=common.fd_label(cfg),
                                     is_like=inception_like_score(logits), accuracy=(logits.argmax(1) == labels).double().mean().item(),
                                     precision=precision, recall=recall, diversity=within_class_distance(f, labels), diversity_test=div_real,
                                     nfe=passes, classifier_evals=cfg.sample_steps if kind.startswith("classifier") and scale != 0 else 0,
                                     images_per_s=len(x) / dt, sampler=f"{cfg.sampler} {cfg.sample_steps}", samples=len(x))
            log.write(rec)
            table.append(rec)
            keep = x.view(n_classes, cfg.sweep_n, *data.shape)[:, :cfg.grid].flatten(0, 1)  # (K * grid, C, H, W)
            common.save_grid(keep, run.out / f"sweep_{kind}_{scale:g}.png", nrow=min(cfg.grid, cfg.sweep_n))
    if table:
        lines = [f"{len(labels)} samples per setting ({cfg.sweep_n} per class), {cfg.sampler} {cfg.sample_steps} steps, step {step}; "
                 f"{common.fd_label(cfg)} against {n} test images; test images' diversity {div_real:.3f}", "",
                 "| guidance | scale | FD | IS-like | accuracy | precision | recall | diversity | U-Net evals | images/s |", "|" + " --- |" * 10]
        lines += [f"| {r['guidance']} | {r['scale']:g} | {r['fd']:.2f} | {r['is_like']:.3f} | {r['accuracy']:.3f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['diversity']:.3f} | {r['nfe']} | {r['images_per_s']:.2f} |" for r in table]
        with common.writing(run.out / "sweep.md"):
            (run.out / "sweep.md").write_text("\n".join(lines) + "\n")
        run.print("\n".join(lines))
    return table

# ----------------------------------------------------------------------------- train
def classifier_path(cfg):
    return cfg.classifier_ckpt or os.path.join(os.path.dirname(cfg.ckpt) or ".", "classifier.pt")

def load_classifier(cfg, device):
    """The classifier checkpoint (classifier_path), built with its own cls_* settings, or None if there is none."""
    if not os.path.isfile(path := classifier_path(cfg)):
        return None
    ckpt = common.load_checkpoint(path, (CLASSIFIER,))
    own = {k: v for k, v in ckpt["config"].items() if k.startswith("cls_") or k in ("ch_mult", "attn_res", "head_channels")}
    classifier = Classifier(replace(cfg, **own), ckpt["shape"], ckpt["n_classes"])
    common.load_model_state(classifier, ckpt["model"], path)
    return classifier.to(device).eval()

def save_images(model, cfg, data, conds, run, name):  # a row of cfg.grid samples per class, with --guidance / --scale
    labels, kind = torch.arange(conds.n_classes).repeat_interleave(cfg.grid), cfg.guidance if cfg.guidance != "classifier" else "none"
    x = guided_sample(model, None, make_schedule(cfg, cfg.sample_steps).to(run.device), data.shape, labels, kind, cfg.scale, cfg, conds, run)
    common.save_grid(x, run.out / f"{name}.png", nrow=cfg.grid)

def fit(cfg, run, method, model, opt, batches, loss_of, lr_at, ema=None, every_step=None, **saved):
    """One network's training loop (the diffusion model, or the classifier): resume, the guarded update, the log line,
    checkpoints (also at the end and on Ctrl-C). loss_of(net, batch) -> (loss, terms); lr_at(step) a Python number."""
    update, parts = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge), {"ema": ema} if ema else {}
    step = common.resume(cfg, run, method, model, optimizer=opt, batches=batches, update=update, **parts)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    save = lambda: common.save_checkpoint(cfg, run, method, step, model=model, optimizer=opt, batches=batches, update=update, **parts, **saved)
    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:  # (no host sync)
                group["lr"] = lr_at(step)
            with run.autocast():
                loss, terms = loss_of(net, next(batches))
            opt.zero_grad(set_to_none=True)
            update(loss)
            if ema:
                ema.update(model, step + 1)
            step += 1
            log(step, terms)
            if every_step:
                every_step(step, log)
            if common.every(step, cfg.ckpt_every):
                save()
    if run.world > 1:
        common.ddp_check(model, run)
    save()
    stop.exit_if_stopped(step)
    return step, log

def train_diffusion(cfg, data, run, conds):
    """The conditional diffusion model with condition dropout (Ho & Salimans Algorithm 1): ckpt.pt."""
    sched = make_schedule(cfg).to(run.device)
    model = UNet(cfg, data.shape, conds.n_classes, conds.vocab).to(run.device)
    model = model.to(memory_format=torch.channels_last) if run.device.type == "cuda" else model
    ema, opt = common.EMA(model, cfg.ema, cfg.ema_warmup), torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    run.print(f"guided diffusion U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | T {cfg.T} {cfg.schedule} | "
              f"condition {cfg.cond}" + (f" ({conds.vocab - 1} words, {cfg.text_layers}-layer transformer)" if conds.text else "")
              + f" | p_uncond {cfg.p_uncond}")
    def loss_of(net, batch):  # captions: a random template for each image
        x, y = batch
        return loss_fn(net, sched, x, conds.of(y, torch.randint(0, len(TEMPLATES), y.shape, device=y.device)), conds.null, cfg.p_uncond)
    def every_step(step, log):
        if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
            log.write(evaluate(ema.model, None, data, cfg, run, step))
        if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
            save_images(ema.model, cfg, data, conds, run, f"samples_{step}")
    step, log = fit(cfg, run, METHOD, model, opt, common.Batches(data, cfg, run, hflip=cfg.hflip, labels=True), loss_of,
                    lambda step: cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)), ema, every_step,  # linear warm-up
                    shape=list(data.shape), n_classes=conds.n_classes)
    if run.main and step >= cfg.steps:
        save_images(ema.model, cfg, data, conds, run, f"samples_{step}")
        log.write(evaluate(ema.model, None, data, cfg, run, step))
    return ema.model

def train_classifier(cfg, data, run, n_classes):
    """The noisy classifier p_phi(y | x_t, t) (ADM): its own checkpoint, classifier.pt."""
    ccfg = replace(cfg, steps=cfg.cls_steps or cfg.steps, lr=cfg.cls_lr, ckpt=classifier_path(cfg))  # what common's helpers read
    sched, classifier = make_schedule(cfg).to(run.device), Classifier(cfg, data.shape, n_classes).to(run.device)
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.cls_lr, weight_decay=cfg.cls_weight_decay, fused=run.fused)
    run.print(f"noisy classifier {sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M parameters | AdamW lr {cfg.cls_lr} "
              f"annealed to 0 over {ccfg.steps} steps, weight decay {cfg.cls_weight_decay}")
    fit(ccfg, run, CLASSIFIER, classifier, opt, common.Batches(data, ccfg, run, hflip=cfg.hflip, labels=True),
        lambda net, batch: classifier_loss(net, sched, *batch), lambda step: cfg.cls_lr * (1 - step / ccfg.steps),  # ADM's anneal_lr
        shape=list(data.shape), n_classes=n_classes)
    return classifier.eval()

def load_data(cfg):
    data = common.load_data(cfg)
    if data.kind != "image" or data.train_labels is None:
        common.fail(f"guidance.py needs labelled images (fashion-mnist, mnist, cifar10); --dataset {cfg.dataset} has "
                    + ("no labels" if data.kind == "image" else f"{data.kind} data"))
    if cfg.cond == "text" and data.name not in NAMES:
        common.fail(f"--cond text needs class names for its captions; known for {', '.join(NAMES)}")
    return data

def report(model, classifier, data, cfg, run, step):  # the held-out numbers, then the sweep
    log = common.Logger(cfg, run, step)
    log.write(evaluate(model, classifier, data, cfg, run, step))
    return sweep(model, classifier, data, cfg, run, step, log) if cfg.sweep_n else []

def train(cfg):
    data, run = load_data(cfg), common.setup(cfg, METHOD)
    conds = Conditions(cfg, data.name, int(data.train_labels.max()) + 1, run.device)
    model = classifier = None
    if cfg.stage in ("all", "diffusion"):
        model = train_diffusion(cfg, data, run, conds)
    if cfg.stage in ("all", "classifier"):
        classifier = train_classifier(cfg, data, run, conds.n_classes)
    if cfg.stage == "all" and run.main:
        report(model, classifier, data, cfg, run, cfg.steps)
    return model, classifier

# ----------------------------------------------------------------------------- main
def main():
    argv = ["--label" + a[7:] if a == "--class" or a.startswith("--class=") else a for a in sys.argv[1:]]  # (class: a Python keyword)
    cfg = resolve(common.parse_config(Config, PRESETS, METHOD, argv=argv))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    n_classes, shape = ckpt["n_classes"], ckpt["shape"]
    conds = Conditions(cfg, cfg.dataset, n_classes, run.device)
    model = UNet(cfg, shape, n_classes, conds.vocab).to(run.device).eval()
    common.load_model_state(model, ckpt["ema"], cfg.ckpt)  # the EMA weights
    classifier = load_classifier(cfg, run.device)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        if not -1 <= cfg.label < n_classes or cfg.prompt and cfg.guidance == "classifier":
            common.fail(f"--class {cfg.label} out of range; accepted: 0..{n_classes - 1}, or -1 for a row per class" if not cfg.prompt else
                        "--prompt samples with --guidance free or none (the classifier knows labels, not captions)")
        one, per = cfg.label >= 0 or cfg.prompt, math.ceil(cfg.sample / n_classes)  # one class (or prompt), or a row per class
        labels = torch.full((cfg.sample,), max(cfg.label, 0)) if one else torch.arange(n_classes).repeat_interleave(per)[:cfg.sample]
        t0, c = time.time(), conds.captions.encode(cfg.prompt)[None].to(run.device) if cfg.prompt else None
        x = guided_sample(model, classifier, make_schedule(cfg, cfg.sample_steps).to(run.device), shape, labels, cfg.guidance, cfg.scale,
                          cfg, conds, run, c).cpu()
        dt, passes = time.time() - t0, cfg.sample_steps * (2 if cfg.guidance == "free" and cfg.scale != 0 else 1)
        common.save_grid(x, run.out / "sample.png", nrow=None if one else per)
        what = f"prompt {cfg.prompt!r}" if cfg.prompt else f"class {cfg.label}" if cfg.label >= 0 else "a row per class"
        print(f"{cfg.sample} samples ({what}, guidance {cfg.guidance} {cfg.scale:g}) in {dt:.3f}s ({cfg.sample / dt:.2f} images/s, "
              f"{passes} U-Net evaluations each" + (f" + {cfg.sample_steps} classifier gradients" if cfg.guidance == "classifier" and cfg.scale else "")
              + f") -> {run.out / 'sample.png'}")
    if cfg.eval:
        report(model, classifier, load_data(cfg), cfg, run, ckpt["step"])

if __name__ == "__main__":
    main()
