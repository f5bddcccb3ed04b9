"""Image GPT (iGPT): a GPT-2 transformer over the flattened pixel sequence, and a linear probe of its features.

Chen, Radford, Child, Wu, Jun, Dhariwal, Luan & Sutskever, "Generative Pretraining from Pixels", ICML 2020
(https://cdn.openai.com/papers/Generative_Pretraining_from_Pixels_V1_ICML.pdf; no arXiv id). GPT-2 blocks:
Radford et al. 2019; BERT objective: Devlin et al., arXiv 1810.04805. Slides: "Generative Pretraining from Pixels".

An image is flattened in raster order into n tokens x_1..x_n (no 2D structure is given to the model) and a
decoder-only transformer with causal self-attention models

    p(x) = prod_{i=1}^n p(x_{pi_i} | x_{pi_1}, ..., x_{pi_{i-1}}, theta),   pi = raster order
    L_AR = E_{x ~ X}[-log p(x)]                                            (slide "Generative Pretraining from Pixels")
    L_BERT = E_{x ~ X} E_M sum_{i in M} -log p(x_i | x_[1,n] \\ M)         (--objective bert: M = 15% of positions,
                                                                            bidirectional attention; no likelihood)

Blocks are pre-norm GPT-2 blocks: h <- h + attn(LN(h)), h <- h + mlp(LN(h)), learned token and position
embeddings, a start-of-sequence token, an output head untied from the token embedding (as openai/image-gpt's
src/model.py: wtet apart from wte). Tokens: 8-bit grayscale values
(256 tokens), binarized values with --binarize (2 tokens), or for colour images the paper's 9-bit palette:
k-means with k = 512 over the (R, G, B) pixels of (a subsample of) the training set, stored in the checkpoint
as the buffer `palette`; a pixel becomes the index of its nearest centroid (1 token per pixel, not 3).

Units. Grayscale 8-bit: test NLL in bits/dim of the 8-bit data, exact (softmax over all 256 values).
Binarized: nats per image, exact. Palette (colour): the model is a distribution over quantized images q(x),
so the exact number is -log P(q(x)): reported as nats per image (test_nll, unit "nats") and bits per palette
token (= nats / (H W ln 2)). It is not the bits/dim of the 8-bit data: any extension P(x) = P(q(x)) P(x | q(x))
gives -log P(x) >= -log P(q(x)), so nats / (3 H W ln 2) is a lower bound on the bits/dim such a model would
have, and is not comparable with the bits/dim of the other files. `seq_nll_nats` is always nats per image.
Linear probe: the residual stream after block L/2 (paper: the best layer is near the middle), layer-normed
without parameters and average-pooled over positions, fit by multinomial logistic regression (LBFGS, small L2)
on --probe-n training images; test accuracy next to the same probe on the raw pixels the model sees.

Simplifications / deviations: the `fashion-mnist` preset DOWNSAMPLES to 14 x 14 (--downsample 2: 2x2 average,
rounded to 8 bits), 196 tokens, a 4-layer width-128 model for CPU; its likelihood is of the downsampled 8-bit
data only. `cifar10` preset = iGPT-S (24 layers, width 512, 8 heads, 76M parameters in the paper) on 32x32
images through the 9-bit palette (1024 tokens, the paper's 32x32x3 -> 32x32 reduction); the paper pre-trains
on ImageNet and probes CIFAR-10, here the model is trained on the CIFAR-10 training set itself. Optimiser:
AdamW with --weight-decay 0 by default, i.e. Adam, beta1 = 0.9 and beta2 = 0.95 as the paper (sec. 3.4), no
dropout (as the paper); learning rate lr(step) = lr * min(1, (step + 1) / max(warmup, 1)) * (1 + cos(pi step /
steps)) / 2, a linear warm-up times a cosine that starts at step 0 and reaches 0 at --steps (the paper warms up
for one epoch, then decays to 0 by a cosine); lr, batch and steps of the presets are ours (the paper's iGPT-S lr
is not reproduced here), as is clipping the gradient norm at 1.
Departures from openai/image-gpt's src/model.py (the paper: "the same model code as GPT-2", sec. 3.3): its norm()
divides by the root mean square of the features without subtracting their mean and has a gain only, LN here is
nn.LayerNorm (mean subtracted, gain and bias); its dense layers (q, k, v, the attention output, both MLP layers)
have no biases, here they do; its MLP uses gelu2(x) = x sigmoid(1.702 x), here the exact (erf) GELU; its logit
projection wtet starts at zero (the paper: "zero-initialize all projections producing logits") and its attention
weights have std 1/sqrt(d) (the output projection 1/sqrt(d L)), here every dense weight starts as N(0, 0.02) (the
embeddings match: std 0.02 for tokens and the start token, 0.01 for positions); with --objective bert it
multiplies the masked positions' token embeddings by 0 (their position embeddings stay) and averages the masked
cross-entropy within each image before the batch mean, here a masked position gets a learned mask token (input id
`vocab`), at least one position per image is masked, and the loss is the mean over all masked positions of the
batch.
k-means: Lloyd iterations from distinct colours of the subsample (not the paper's exact k-means code). The
`mnist` preset is the fashion-mnist one (8-bit, not binarized unless --binarize is given).

Run:
    python igpt.py                                       # fashion-mnist at 14x14, tiny model on CPU
    python igpt.py --dataset cifar10 --compile           # iGPT-S on CIFAR-10 with the 9-bit palette, GPU
    python igpt.py --objective bert                      # the BERT objective (probe accuracy only)
    python igpt.py --eval --ckpt runs/igpt/fashion-mnist/ckpt.pt ; python igpt.py --sample 64 --ckpt ...

Result (fashion-mnist preset: 14x14 downsampled, 4 layers, width 128, 0.88M parameters, batch 32; 1 CPU thread
on a shared 2-core machine, OMP_NUM_THREADS=1), fixed budgets shorter than the preset's 2000 steps:
    python igpt.py --steps 1000 --warmup 40 --eval-n 1000 --probe-n 2000 --log-every 100 --device cpu
    test NLL 3.625 bits/dim of the 14x14 8-bit data (exact; first 1000 test images), 492.5 nats per image;
    linear probe (block 2 of 4, 2000 training images, 1000 test images) 74.5% vs 80.1% on raw pixels;
    1.7 it/s (0.6 s per step, 10.5 min in all with evaluation and probe).
    The same with --steps 400 --log-every 50: 3.996 bits/dim, probe 71.7% vs 80.1% (raw pixels), 0.8-1.4 s/step
    (the machine was busier). At these budgets the features stay below raw pixels (rising 71.7% -> 74.5%, 400 -> 1000 steps).
    python igpt.py --sample 16 --ckpt runs/igpt/fashion-mnist/ckpt.pt (the 400-step checkpoint)
    0.038 s per image with the key/value cache (16 images in one batch, 196 one-token evaluations);
    without the cache (sample(..., cache=False), the whole prefix re-run per token) 0.717 s per image.
Full 28 x 28 (784 tokens, 0.96M parameters), the budget of pixelcnn.py's comparison (OMP_NUM_THREADS=2, shared):
    python igpt.py --downsample 1 --steps 200 --batch-size 32 --warmup 20 --eval-n 500 --probe-n 2000
    test NLL 3.934 bits/dim (exact; first 500 test images); probe 67.2% vs 81.0% on raw pixels; ~2 s/step.
Not yet measured: the preset's full 2000 steps, --objective bert, cifar10 / iGPT-S (needs a GPU).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "igpt"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    objective: str = common.choice("ar", "bert")  # ar: L_AR, causal; bert: predict 15% masked tokens, bidirectional
    layers: int = 4  # transformer blocks L
    width: int = 128  # d_model
    heads: int = 4  # attention heads
    palette: int = 512  # colour images: k-means palette size (9-bit); grayscale uses 256 (or 2 with --binarize) tokens
    kmeans_pixels: int = 200_000  # training pixels the palette's k-means runs on
    kmeans_iters: int = 20  # Lloyd iterations of the k-means
    downsample: int = 1  # average-pool images by this factor before tokenizing (2: 28x28 -> 14x14)
    mask_frac: float = 0.15  # bert: fraction of positions masked
    warmup: int = 100  # linear lr warm-up steps; lr = lr * warm-up * cosine (0 at --steps; --resume with a larger --steps re-stretches it)
    beta2: float = 0.95  # Adam beta2 (paper: 0.95)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    probe_n: int = 5000  # training images for the linear probe (0 = no probe)
    probe_layer: int = 0  # block whose output is probed (0 = max(1, layers // 2))
    n_samples: int = 16  # images per sample grid (completions: 8 test images, 3 completions each)


PRESETS = {
    "fashion-mnist": dict(downsample=2, layers=4, width=128, heads=4, steps=2000, batch_size=32, lr=1e-3, warmup=100,
                          log_every=100, ckpt_every=500, eval_n=1000, probe_n=5000),
    "mnist": dict(downsample=2, layers=4, width=128, heads=4, steps=2000, batch_size=32, lr=1e-3, warmup=100,
                  log_every=100, ckpt_every=500, eval_n=1000, probe_n=5000),
    "cifar10": dict(layers=24, width=512, heads=8, palette=512, steps=100_000, batch_size=64, lr=1e-3, warmup=2000,
                    log_every=200, ckpt_every=5000, eval_every=20000, eval_n=2000, probe_n=10000, n_samples=32),
}


# ----------------------------------------------------------------------------- palette and tokens
def kmeans_palette(pixels, k, iters, generator=None):
    """k-means (Lloyd) over RGB pixels (N, 3) in [0, 255] -> centroids (k, 3) in fp32. Initialised with k distinct
    colours of the data (all of them, padded by repeats, if there are at most k: such data round-trips exactly)."""
    pixels = pixels.float()
    colours = torch.unique(pixels, dim=0)
    if len(colours) <= k:
        return torch.cat([colours, colours[:1].expand(k - len(colours), 3)])
    c = colours[torch.randperm(len(colours), generator=generator)[:k]].clone()
    for _ in range(iters):
        a = nearest(pixels, c)  # (N,)
        s = torch.zeros_like(c).index_add_(0, a, pixels)
        n = torch.zeros(k, dtype=pixels.dtype).index_add_(0, a, torch.ones_like(a, dtype=pixels.dtype))
        c = torch.where(n[:, None] > 0, s / n.clamp_min(1)[:, None], c)  # an empty cluster keeps its centroid
    return c


def nearest(pixels, palette, chunk=65536):
    """Index of the nearest centroid (squared Euclidean) of each pixel (N, 3) -> (N,)."""
    return torch.cat([torch.cdist(p, palette).argmin(1) for p in pixels.split(chunk)])


def downsample(x, factor):
    """uint8 (N, C, H, W) -> uint8 (N, C, H/f, W/f): 2D average over f x f, rounded to the nearest 8-bit value."""
    if factor == 1:
        return x
    return F.avg_pool2d(x.float(), factor).round().to(torch.uint8)


def tokenize(model, x):
    """Images in [0, 1] (B, C, H, W) -> tokens (B, n), raster order: palette index (colour), 8-bit value, or 0/1."""
    if model.palette.numel():
        return nearest((x * 255).permute(0, 2, 3, 1).reshape(-1, 3), model.palette).view(len(x), -1)  # (B, H*W)
    return (x * (model.vocab - 1)).round().long().flatten(1)  # (B, C*H*W), C = 1


def detokenize(model, tokens):
    """Tokens (B, n) -> images in [0, 1] (B, C, H, W)."""
    C, H, W = model.shape
    if model.palette.numel():
        return (model.palette[tokens] / 255).view(len(tokens), H, W, 3).permute(0, 3, 1, 2)
    return (tokens.float() / (model.vocab - 1)).view(len(tokens), C, H, W)


# ----------------------------------------------------------------------------- networks
class Block(nn.Module):
    """Pre-norm GPT-2 block: h <- h + attn(LN(h)); h <- h + mlp(LN(h))."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def attn(self, h, causal, cache, pos):
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if cache is not None:  # write this chunk's keys/values at positions pos..pos+T-1, attend to all so far
            cache["k"][:, :, pos:pos + T], cache["v"][:, :, pos:pos + T] = k, v
            k, v = cache["k"][:, :, :pos + T].to(q.dtype), cache["v"][:, :, :pos + T].to(q.dtype)
            assert pos == 0 or T == 1, "the cache is filled from position 0, then one token at a time"
            causal = causal and T > 1  # one new query may see every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, h, causal=True, cache=None, pos=0):
        h = h + self.attn(self.ln1(h), causal, cache, pos)
        return h + self.mlp(self.ln2(h))


class IGPT(nn.Module):
    """Token + position embeddings, L blocks, final LN, untied head to the `vocab` data tokens. Input id `vocab` is
    the start token (AR) or the mask token (BERT)."""

    def __init__(self, cfg, shape, vocab, palette=None):
        super().__init__()
        self.shape, self.vocab, self.causal = tuple(shape), vocab, cfg.objective == "ar"
        self.n = shape[1] * shape[2] * (1 if shape[0] == 3 and palette is not None else shape[0])  # tokens per image
        if cfg.width % cfg.heads:
            common.fail(f"--width {cfg.width} is not divisible by --heads {cfg.heads}")
        self.register_buffer("palette", palette if palette is not None else torch.zeros(0, 3))  # (K, 3) in [0, 255]
        self.tok = nn.Embedding(vocab + 1, cfg.width)
        self.pos = nn.Parameter(torch.randn(self.n, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f, self.head = nn.LayerNorm(cfg.width), nn.Linear(cfg.width, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):  # GPT-2: N(0, 0.02) weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, inp, upto=None, cache=None, pos=0):
        """inp: ids (B, T) or one-hot floats (B, T, vocab + 1) at positions pos..pos+T-1 -> residual stream (B, T, d)
        after block `upto` (default: all blocks, then the final LN)."""
        h = (inp @ self.tok.weight if inp.is_floating_point() else self.tok(inp)) + self.pos[pos:pos + inp.shape[1]]
        for i, block in enumerate(self.blocks[:upto]):
            h = block(h, self.causal, cache[i] if cache is not None else None, pos)
        return self.ln_f(h) if upto is None else h

    def forward(self, inp, cache=None, pos=0):
        return self.head(self.hidden(inp, cache=cache, pos=pos))  # (B, T, vocab)

    def new_cache(self, batch, device, dtype):
        hs = self.tok.weight.shape[1] // self.blocks[0].heads
        z = lambda: torch.zeros(batch, self.blocks[0].heads, self.n, hs, device=device, dtype=dtype)
        return [{"k": z(), "v": z()} for _ in self.blocks]


# ----------------------------------------------------------------------------- objective
def ar_input(model, x):
    """Data tokens (B, n) -> inputs [start, x_1, ..., x_{n-1}] (B, n): the logits at i predict x_i from x_<i."""
    return torch.cat([torch.full_like(x[:, :1], model.vocab), x[:, :-1]], 1)


# slide "Generative Pretraining from Pixels": log p(x) = sum_i log p(x_i | x_<i), in fp32
def log_prob(model, x, net=None):
    logits = (net or model)(ar_input(model, x)).float()  # (B, n, vocab)
    return -F.cross_entropy(logits.transpose(1, 2), x, reduction="none").sum(1)  # (B,)


# slide "Generative Pretraining from Pixels": L_AR = E[-log p(x)], returned per token (nats)
def loss_ar(model, x, net=None):
    nll = -log_prob(model, x, net)
    return nll.mean() / x.shape[1], nll


# paper, eq. 2: L_BERT = E_M sum_{i in M} -log p(x_i | x without M), M ~ 15% of positions (at least one)
def loss_bert(model, x, mask_frac, generator=None, net=None):
    u = torch.rand(x.shape, device=x.device, generator=generator)
    m = (u < mask_frac) | (u == u.min(1, keepdim=True).values)  # (B, n) masked positions
    logits = (net or model)(torch.where(m, model.vocab, x)).float()
    ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (B, n)
    return (ce * m).sum() / m.sum(), m


def objective(model, x, cfg, net=None):
    """(loss, terms) for a batch of data tokens x (B, n); terms in the units evaluate reports. net: model wrapped
    by DDP / torch.compile, through which the forward runs."""
    if cfg.objective == "bert":
        loss, _ = loss_bert(model, x, cfg.mask_frac, net=net)
        return loss, {"loss": loss}
    loss, nll = loss_ar(model, x, net)
    unit = {"bpd": common.bits_per_dim(nll.mean(), x.shape[1])} if model.vocab == 256 else {"nats": nll.mean()}
    return loss, {"loss": loss, **unit}


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device, prefix=None, cache=True, generator=None, temperature=1.0):
    """Ancestral sampling x_i ~ p(x_i | x_<i), i = p+1..n_tokens, batched; with `cache` the keys/values of earlier
    positions are kept (one token through the network per step), else the whole prefix is re-run every step.
    prefix (n, p): given first tokens (image completion, p = 0 without). Returns tokens (n, n_tokens) and, fp32,
    the logits (n, n_tokens - p, vocab) that x_{p+1}, ..., x_{n_tokens} were drawn from (before the temperature)."""
    T, dtype = model.n, next(model.parameters()).dtype
    x = torch.zeros(n, T, dtype=torch.long, device=device)
    p = 0 if prefix is None else prefix.shape[1]
    if p:
        x[:, :p] = prefix
    logits = torch.zeros(n, T - p, model.vocab, device=device)
    kv = model.new_cache(n, device, dtype) if cache else None
    for i in range(p, T):
        if not cache:  # inputs [start, x_1, ..., x_{i-1}] at positions 0..i, all through the network again
            logits[:, i - p] = model(ar_input(model, x)[:, :i + 1])[:, i].float()
        elif i == p:  # prefill: positions 0..p (start token and the prefix) at once, their keys/values into kv
            logits[:, 0] = model(ar_input(model, x)[:, :p + 1], cache=kv, pos=0)[:, p].float()
        else:  # one new input, x_{i-1} at position i
            logits[:, i - p] = model(x[:, i - 1:i], cache=kv, pos=i)[:, 0].float()
        x[:, i] = torch.multinomial(F.softmax(logits[:, i - p] / temperature, -1), 1, generator=generator)[:, 0]
    return x, logits


def check_sampler(model):
    if not model.causal:
        common.fail("--sample needs a model trained with --objective ar (BERT defines no sampler)")


@torch.no_grad()
def complete(model, x, k=3, generator=None):
    """Image completion: keep the top half of each image's tokens, sample the rest k times. x: tokens (B, n) ->
    images (B * (k + 1), C, H, W), per row the original then k completions."""
    half = model.n // 2
    out = [x] + [sample(model, len(x), x.device, prefix=x[:, :half], generator=generator)[0] for _ in range(k)]
    return detokenize(model, torch.stack(out, 1).flatten(0, 1))  # (B*(k+1), C, H, W)


def save_images(model, x, out, step, n):
    model.eval()
    common.save_grid(detokenize(model, sample(model, n, x.device)[0]), out / f"samples_{step}.png")
    common.save_grid(complete(model, x[:8]), out / f"completions_{step}.png", nrow=4)  # row: original, 3 completions
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def probe_features(model, x, layer):
    """Middle-layer features of data tokens x (B, n): the residual stream after `layer` blocks, LN without
    parameters, average-pooled over positions -> (B, d). AR: on [start, x_<n]; BERT: on x unmasked."""
    inp = ar_input(model, x) if model.causal else x
    h = model.hidden(inp, upto=layer).float()
    return F.layer_norm(h, h.shape[-1:]).mean(1)


def linear_probe(f_train, y_train, f_test, y_test, l2=1e-4, iters=100):
    """Multinomial logistic regression (a linear layer, LBFGS on the standardized training features) -> test accuracy."""
    with torch.enable_grad():
        mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
        a, b = (f_train - mu) / sd, (f_test - mu) / sd
        lin = nn.Linear(a.shape[1], int(y_train.max()) + 1).to(a.device)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lin(a), y_train) + l2 * lin.weight.square().sum()
            loss.backward()
            return loss
        opt.step(closure)
        return (lin(b).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def evaluate(model, data, cfg, run, step, batch_size=50):
    """AR: exact test NLL (bits/dim of 8-bit grayscale; nats per image for binarized or palette tokens), plus the
    sequence NLL in nats per image and bits per token. BERT: masked-token cross-entropy (no likelihood). With
    labels and --probe-n: linear-probe test accuracy of the middle layer and of raw pixels."""
    model.eval()
    nll, gen = [], torch.Generator(device=run.device).manual_seed(0)
    n_test = 0
    for x in common.test_batches(data, cfg, run.device, batch_size, "exact NLL" if model.causal else "masked-token loss"):
        x, n_test = tokenize(model, x), n_test + len(x)
        with run.autocast():
            nll.append(-log_prob(model, x) if model.causal else loss_bert(model, x, cfg.mask_frac, gen)[0].expand(len(x)))
    nll = torch.cat(nll).mean().item()
    extras = {}
    if model.causal:
        n_tok = model.n
        extras = dict(seq_nll_nats=nll, bits_per_token=common.bits_per_dim(nll, n_tok), tokens=n_tok, vocab=model.vocab)
    else:
        extras = dict(masked_ce_nats=nll, mask_frac=cfg.mask_frac)
    if cfg.probe_n and data.train_labels is not None and data.test_labels is not None:
        layer = cfg.probe_layer or max(1, len(model.blocks) // 2)
        run.print(f"evaluate: linear probe of block {layer} on {min(cfg.probe_n, len(data.train))} training images, and of raw pixels")
        train_x, test_x = data.train[:cfg.probe_n].float() / 255, data.test[:cfg.eval_n or None].float() / 255  # not binarized
        feats = lambda xb: torch.cat([probe_features(model, tokenize(model, b.to(run.device)), layer) for b in xb.split(batch_size)])
        y_tr, y_te = data.train_labels[:cfg.probe_n].to(run.device), data.test_labels[:len(test_x)].to(run.device)
        pix = lambda xb: xb.flatten(1).to(run.device)  # the raw-pixel baseline, on the (downsampled) images the model sees
        extras.update(probe_acc=linear_probe(feats(train_x), y_tr, feats(test_x), y_te),
                      probe_acc_pixels=linear_probe(pix(train_x), y_tr, pix(test_x), y_te),
                      probe_layer=layer, probe_n=len(y_tr))
    model.train()
    if not model.causal:
        return common.eval_record(step, None, "nats", None, n_test, **extras)
    if model.vocab == 256:  # 8-bit grayscale: exact bits/dim of the (downsampled) 8-bit data
        return common.eval_record(step, common.bits_per_dim(nll, model.n), "bpd", "exact", n_test, **extras)
    return common.eval_record(step, nll, "nats", "exact", n_test, **extras)  # binarized, or palette images


# ----------------------------------------------------------------------------- train
def prepare(cfg):
    """The data set, downsampled by cfg.downsample, as 8-bit images; and the vocabulary size."""
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"igpt.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    C, H, W = data.shape
    if cfg.downsample < 1 or H % cfg.downsample or W % cfg.downsample:
        common.fail(f"--downsample {cfg.downsample} must be >= 1 and divide the image sides ({H}x{W})")
    if C not in (1, 3):
        common.fail(f"igpt.py needs 1 or 3 channels; got {C}")
    if cfg.binarize and C == 3:
        common.fail("--binarize needs grayscale images; colour images use the k-means palette")
    if C == 3 and not 2 <= cfg.palette <= 4096:
        common.fail(f"--palette {cfg.palette} out of range; accepted: 2..4096")
    if not 0 <= cfg.probe_layer <= cfg.layers:
        common.fail(f"--probe-layer {cfg.probe_layer} out of range; accepted: 0..{cfg.layers} (0 = the middle block)")
    if not 0 < cfg.mask_frac < 1:
        common.fail(f"--mask-frac {cfg.mask_frac} out of range; accepted: 0 < f < 1")
    if cfg.downsample > 1:
        tr, te = downsample(data.train, cfg.downsample), downsample(data.test, cfg.downsample)
        data = common.Data(data.name, "image", tuple(tr.shape[1:]), tr, te, data.train_labels, data.test_labels)
    vocab = cfg.palette if C == 3 else 2 if cfg.binarize else 256
    return data, vocab


def train(cfg):
    data, vocab = prepare(cfg)
    run = common.setup(cfg, METHOD)
    palette = None
    if data.shape[0] == 3:  # the paper's palette: k-means over training pixels (checkpoint buffer; resume overwrites)
        g = torch.Generator().manual_seed(cfg.seed)
        px = data.train.permute(0, 2, 3, 1).reshape(-1, 3)
        t = time.time()
        palette = kmeans_palette(px[torch.randint(len(px), (min(cfg.kmeans_pixels, len(px)),), generator=g)], vocab, cfg.kmeans_iters, g)
        run.print(f"palette: k-means, k = {vocab}, on {min(cfg.kmeans_pixels, len(px))} pixels in {time.time() - t:.1f}s")
    model = IGPT(cfg, data.shape, vocab, palette).to(run.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = tokenize(model, next(common.test_batches(data, cfg, run.device, 8)))
    run.print(f"iGPT ({cfg.objective}, {cfg.layers} layers, width {cfg.width}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters, {model.n} tokens of {vocab} values, image {'x'.join(map(str, data.shape))})")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update,
                               shape=list(data.shape), vocab=vocab)

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for group in opt.param_groups:  # linear warm-up times cosine decay (a python float: no sync)
                group["lr"] = lr
            x = tokenize(model, next(batches))
            with run.autocast():
                loss, terms = objective(model, x, cfg, net)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and model.causal and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(model, fixed, run.out, step, cfg.n_samples)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        if model.causal:
            save_images(model, fixed, run.out, step, cfg.n_samples)
        log.write(evaluate(model, data, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    shape, vocab = ckpt["shape"], ckpt["vocab"]
    palette = ckpt["model"]["palette"] if shape[0] == 3 else None
    model = IGPT(cfg, shape, vocab, palette).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        check_sampler(model)
        t = time.time()
        with run.autocast():
            x = detokenize(model, sample(model, cfg.sample, run.device)[0]).float().cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.2f} images/s, {dt / cfg.sample:.3f} s/image, "
              f"{model.n} cached network evaluations of 1 token each) -> {run.out / 'sample.png'}")
    if cfg.eval:
        data, _ = prepare(cfg)
        common.Logger(cfg, run, 0).write(evaluate(model, data, cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
