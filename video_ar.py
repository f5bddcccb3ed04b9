"""Autoregressive video: the Video Transformer (block-local self-attention over subscaled slices) and VideoGPT (a 3D
VQ-VAE over space-time, then a GPT prior over its codes). Weissenborn, Tackstrom & Uszkoreit, "Scaling Autoregressive
Video Models", arXiv 1906.02634; Yan, Zhang, Abbeel & Srinivas, "VideoGPT", arXiv 2104.10157 (code: wilson1yan/VideoGPT).
Slides: "Scaling Autoregressive Video Models" and "VideoGPT".

--model transformer. A video x (T x H x W pixels, C channels) is split by s = (s_t, s_h, s_w) into S = s_t s_h s_w slices
x_(a,b,c) = x[a::s_t, b::s_h, c::s_w] (slice-raster order, last axis fastest), generated one after another; within a
slice pixels in raster order, channels in order:
    p(x) = prod_k p(x_k | x_<k),  p(x_k | x_<k) = prod_i prod_c p(x_{k,i,c} | x_{k,<i}, x_{k,i,<c}, x_<k)
    -log p(x) / (T H W C ln 2) bits/dim                                    (exact: a softmax over 256 values)
The encoder reads the video with slices >= k masked through a 3D convolution of kernel = stride = s (one output per
slice position, reading that position in every slice) and unmasked block-local layers; the decoder reads slice k
shifted by one pixel, plus the encoder's output, through masked block-local layers. Block-local attention cuts the
slice (T', H', W') into n_p = (T'/t)(H'/h)(W'/w) boxes of t x h x w positions and attends inside each only:
    n_p (t h w)^2 scores instead of (T' H' W')^2                              (slide "Idea 1")
with block shapes cycled over the layers (--blocks) so that information crosses blocks; in the decoder it is causal
within a block (raster order restricted to a box is the box's own raster order). A position is a pixel (the head
gives its C channels): the slide's 4 x 16 x 16 x 3 = 3072-sub-pixel slice is 1024 positions here. Training uses one
slice per video, S (-log p(x_k | x_<k)) with k uniform (unbiased for -log p(x)); evaluate sums all S slices.

--model videogpt. 3D convolutions and axial-attention residual blocks reduce the video by --down (t, h, w); outputs
are quantized to the nearest of K codes (EMA codebook, gamma 0.99; codes initialised from the first batch and
restarted at random encoder outputs when their count EMA N_i < 1: VideoGPT's Codebook); a mirrored decoder maps codes
back; an iGPT-style causal transformer models the flattened code volume p(z) = prod_i p(z_i | z_<i). Sampling: prior,
then decoder. With a point-mass q(z | x):   -log p(x) <= -log p(x | z_q(x)) - log p(z_q(x))   (a bound, bits/dim)

Details and differences. Transformer: no official code found; the slides' and Figure 1's slice order, s = (4, 2, 2)
as its example, encoder over the padded video, decoder over the current slice and changing block shapes are kept. Our
choices (the reimplementation rakhimovv/lvt, used as a check, also draws one random slice per example and has a 256-way
softmax; it differs in the encoder kernel, a masked-convolution shift, sinusoidal positions, a network per channel):
encoder kernel = stride = s; decoder input shifted by one position; learned per-axis positions; one head for all
channels reading h + a channel id + the earlier channels' embeddings, its last layer zero at the start. --bair sizes
(8 + 8 layers, width 512, 4 heads, blocks 4x8x4 / 4x4x8 / 1x32x4 / 1x4x32, Adam lr 2e-4, batch 64, 600k steps) are our
reading of the paper, not checked against its text. --cond-frames F: the encoder sees the first F frames for every
slice and the loss skips them (lvt: known pixels inside their slices); an unconditional model continues given frames
by keeping their pixels where they fall in the order (approximate: pixels drawn before a given one do not see it).
VideoGPT as its clean repository (encoder / decoder plan, AttentionResidualBlock, AxialBlock with 2 heads and no
position embedding, EMA eps 1e-7, restarts at N_i < 1, beta 0.25, the prior's output layer zero at the start) except:
inputs 2x - 1 (VideoGPT: x - 0.5); a discretized-logistic reconstruction (PixelCNN++) instead of MSE / 0.06, so that a
bound exists, with the commitment term summed over the code volume like it (VideoGPT: means); kernel 3, stride 1 along
an axis a stage does not downsample (VideoGPT: kernel 4, same padding); first-batch codes without added noise; prior
blocks pre-norm with exact GELU (VideoGPT: GeLU2), one dropout rate, full-width summed per-axis position tables
(VideoGPT: width/3 each, concatenated), full attention (its BAIR prior: sparse), constant lr after warm-up (its prior:
cosine); no frame-conditioning encoder (VideoGPT: ResNet-34 + cross-attention): a continuation keeps the codes of the
latent time steps the given frames cover and samples the rest (exact for codes; the first frames shown are
reconstructions). --bair VideoGPT: down 4, 2, 2 (the released bair_stride4x2x2), K 1024, D 256, 240 channels, 4
residual blocks, lr 3e-4, batch 32, 100k steps; prior 8 layers, width 512, 4 heads, dropout 0.2, lr 3e-4, 200k steps
(VideoGPT-Paper's BAIR settings; its VQ-VAE downsamples 2, 2, 2 instead).
Data: moving-fashion (default) / moving-mnist from common, 64 x 64 frames average-pooled by --downsample (rounded to
8 bits): the CPU preset models 8 frames of 16 x 16; --bair: 16 frames of 64 x 64, the first one given.

Run:
    python video_ar.py                                   # Video Transformer, moving-fashion 8 x 16 x 16, CPU
    python video_ar.py --model videogpt                  # VQ-VAE, then its GPT prior
    python video_ar.py --bair --dataset moving-mnist     # the BAIR-like configuration on a GPU
    python video_ar.py --eval --ckpt runs/video_ar/moving-fashion/ckpt.pt ; python video_ar.py --sample 8 --ckpt ...

Result (moving-fashion preset, first 200 test videos; 1 CPU thread, two jobs; README has the tables and commands):
    transformer: 1.777 bits/dim exact (seed 1: 1.783), 3000 steps x 16 in 9 min 36 s, 0.317 s per sampled video (batch 8);
    --cond-frames 2: 1.753 of the last 6 frames given the first 2; videogpt: <= 1.843 (seed 1: 1.879) = -log p(x|z) 1.684
    + prior 0.159, 3000 + 3000 steps in 8 min 0 s, 0.010 s per video. --bair, CUDA / bf16 / --compile: not yet measured.
"""
import math, os, sys, time
from dataclasses import dataclass, replace

import torch, torchvision
import torch.distributed as dist, torch.nn as nn, torch.nn.functional as F

import common

METHOD, PRIOR = "video_ar", "video_ar_prior"
V = 256  # intensity levels of a sub-pixel (8-bit)

# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    dataset: str = "moving-fashion"  # moving-fashion | moving-mnist (bouncing digits made from the image set)
    model: str = common.choice("transformer", "videogpt")  # transformer: Weissenborn et al.; videogpt: Yan et al.
    bair: bool = False  # the BAIR-like GPU configuration (16 frames of 64 x 64, the papers' model sizes)
    downsample: int = 4  # average-pool frames by this factor (64 -> 16), rounded to 8 bits
    cond_frames: int = 0  # transformer: the first F frames are given (seen by the encoder, not modelled)
    subscale: str = "2,2,2"  # transformer: s = (s_t, s_h, s_w)
    blocks: str = "4x4x4,1x8x8,4x8x1,4x1x8"  # transformer: block shapes t x h x w, cycled over the layers
    enc_layers: int = 2  # transformer: encoder layers
    dec_layers: int = 4  # transformer: decoder layers
    width: int = 64  # transformer / prior: d_model
    heads: int = 4  # transformer / prior: attention heads
    dropout: float = 0.0  # transformer / prior: dropout on attention and MLP outputs
    warmup: int = 100  # linear lr warm-up steps, then constant (transformer and prior)
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    stage: str = common.choice("all", "ae", "prior")  # videogpt: the VQ-VAE then the prior, or one of them
    down: str = "2,4,4"  # videogpt: downsampling of (time, height, width), powers of 2
    hidden: int = 64  # videogpt: encoder / decoder channels
    n_res: int = 2  # videogpt: axial-attention residual blocks in encoder and decoder
    codes: int = 256  # videogpt: K, codebook size
    code_dim: int = 32  # videogpt: D, dimension of a code
    beta: float = 0.25  # videogpt: commitment weight
    decay: float = 0.99  # videogpt: EMA decay of the codebook
    prior_steps: int = 1500  # videogpt: optimizer steps of the prior
    prior_lr: float = 1e-3  # videogpt: learning rate of the prior
    prior_layers: int = 4  # videogpt: prior transformer layers
    temperature: float = 1.0  # sampling: logits are divided by this
    n_samples: int = 8  # videos per sample grid (and continuations of 4 test videos, 2 each)

PRESETS = {
    "moving-fashion": dict(frames=8, frame_size=64, downsample=4, steps=3000, batch_size=16, lr=1e-3, prior_steps=3000, log_every=100,
                           ckpt_every=500, eval_n=200)}
PRESETS["moving-mnist"] = PRESETS["moving-fashion"]
GPU = dict(frames=16, frame_size=64, downsample=1, log_every=500, ckpt_every=5000, eval_every=50_000, eval_n=256)
BAIR = {  # --bair: 16 frames of 64 x 64 (BAIR robot pushing's size) on a GPU
    "transformer": GPU | dict(cond_frames=1, subscale="4,2,2", blocks="4x8x4,4x4x8,1x32x4,1x4x32", enc_layers=8, dec_layers=8,
                              width=512, heads=4, steps=600_000, batch_size=64, lr=2e-4, warmup=10_000),
    "videogpt": GPU | dict(down="4,2,2", hidden=240, n_res=4, codes=1024, code_dim=256, steps=100_000, batch_size=32, lr=3e-4,
                           prior_steps=200_000, prior_lr=3e-4, width=512, heads=4, prior_layers=8, dropout=0.2)}

def triple(text, name):  # "2,2,2" or "2x2x2" -> (2, 2, 2)
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(a.strip().isdigit() and int(a) > 0 for a in parts):
        common.fail(f"--{name} {text!r} is not three positive integers (t,h,w)")
    return tuple(int(a) for a in parts)

# ----------------------------------------------------------------------------- networks: block-local attention
def to_blocks(h, block):
    """(B, T, H, W, ...) -> (B * n_p, t*h*w, ...): non-overlapping t x h x w blocks, each in its own raster order."""
    B, T, H, W, rest = h.shape[0], *h.shape[1:4], h.shape[4:]
    t, hb, wb = block
    h = h.reshape(B, T // t, t, H // hb, hb, W // wb, wb, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nT, nH, nW, t, h, w, -1)
    return h.reshape(-1, t * hb * wb, *rest)

def from_blocks(h, block, grid):
    """The inverse of to_blocks: (B * n_p, t*h*w, ...) -> (B, T, H, W, ...)."""
    (T, H, W), (t, hb, wb), rest = grid, block, h.shape[2:]
    h = h.reshape(-1, T // t, H // hb, W // wb, t, hb, wb, math.prod(rest)).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return h.reshape(-1, T, H, W, *rest)

class Layer(nn.Module):
    """Pre-norm transformer layer with block-local self-attention (causal within a block for a decoder):
    h <- h + attn_blocks(LN(h)),  h <- h + mlp(LN(h)).  h: (B, T, H, W, D) on the grid (T, H, W)."""
    def __init__(self, width, heads, block, causal, grid, dropout=0.0):
        super().__init__()
        if any(g % b for g, b in zip(grid, block)):
            common.fail(f"block {'x'.join(map(str, block))} does not divide the grid {'x'.join(map(str, grid))}")
        self.heads, self.block, self.causal, self.grid = heads, tuple(block), causal, tuple(grid)
        self.ln1, self.ln2, self.qkv, self.proj = nn.LayerNorm(width), nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp, self.drop = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)), nn.Dropout(dropout)
        members = to_blocks(torch.arange(math.prod(grid)).view(1, *grid), block)  # (n_p, L): each block's positions, raster order
        self.register_buffer("members", members, persistent=False)
        order = members.flatten().argsort()
        self.block_of, self.rank = (order // members.shape[1]).tolist(), (order % members.shape[1]).tolist()  # per position
    def attn(self, h):
        q, k, v = to_blocks(self.qkv(h), self.block).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B n_p, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B n_p, nh, L, hs): n_p (t h w)^2 scores per head
        return self.proj(from_blocks(y.transpose(1, 2).flatten(2), self.block, self.grid))  # (B, T, H, W, D)
    def forward(self, h):
        h = h + self.drop(self.attn(self.ln1(h)))
        return h + self.drop(self.mlp(self.ln2(h)))
    def new_cache(self, batch, like):
        return {kv: like.new_zeros(batch, self.heads, math.prod(self.grid), like.shape[-1] // self.heads) for kv in "kv"}
    def step(self, h, i, cache):
        """One position i (raster index, a python int) of a causal layer, keys / values of earlier ones in cache:
        h (B, D) -> (B, D), equal to forward()'s output at i."""
        q, k, v = self.qkv(self.ln1(h)).unflatten(-1, (3, self.heads, -1)).unbind(1)  # 3 x (B, nh, hs)
        cache["k"][:, :, i], cache["v"][:, :, i] = k, v
        j = self.members[self.block_of[i], :self.rank[i] + 1]  # this block's positions up to i
        y = F.scaled_dot_product_attention(q[:, :, None], cache["k"][:, :, j], cache["v"][:, :, j])  # (B, nh, 1, hs)
        h = h + self.proj(y.flatten(1))
        return h + self.mlp(self.ln2(h))

class PosEmbed(nn.Module):
    """Learned per-axis position embeddings, summed: e_t[t] + e_h[h] + e_w[w] -> (T, H, W, D)."""
    def __init__(self, grid, width):
        super().__init__()
        self.e = nn.ParameterList(nn.Parameter(torch.randn(n, width) * 0.01) for n in grid)
    def forward(self):
        et, eh, ew = self.e
        return et[:, None, None] + eh[None, :, None] + ew[None, None, :]

def up(t):  # at least fp32 (autocast outputs bf16): likelihood arithmetic in fp32, or fp64 for tests
    return t.to(torch.promote_types(t.dtype, torch.float32))

def embed_each(x, table):
    """Sub-pixel values x: long (..., C) or one-hot floats (..., C, V') -> per-channel embeddings (..., C, D) from
    table (C, V', D) (one-hot inputs make the embeddings differentiable in the data, for the causality tests)."""
    if x.is_floating_point():
        return torch.einsum("...cv,cvd->...cd", x, table)
    C, Vp, D = table.shape
    return F.embedding(x + Vp * torch.arange(C, device=x.device), table.reshape(C * Vp, D))

# ----------------------------------------------------------------------------- networks: Video Transformer
def subscale_split(x, s):
    """(B, T, H, W, ...) -> (B, S, T/s_t, H/s_h, W/s_w, ...): slice k = (a, b, c) in raster order is x[:, a::s_t, b::s_h, c::s_w]."""
    (B, T, H, W), rest, (st, sh, sw) = x.shape[:4], x.shape[4:], s
    x = x.reshape(B, T // st, st, H // sh, sh, W // sw, sw, -1).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, st, sh, sw, T', H', W', -1)
    return x.reshape(B, st * sh * sw, T // st, H // sh, W // sw, *rest)

def subscale_merge(x, s):
    """The inverse of subscale_split: (B, S, T', H', W', ...) -> (B, T, H, W, ...)."""
    (B, _, T, H, W), rest, (st, sh, sw) = x.shape[:5], x.shape[5:], s
    x = x.reshape(B, st, sh, sw, T, H, W, -1).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, T', st, H', sh, W', sw, -1)
    return x.reshape(B, T * st, H * sh, W * sw, *rest)

def take_slice(x, k, s):
    """Slice k[b] of every video b: (B, T, H, W, ...) -> (B, T', H', W', ...)."""
    return subscale_split(x, s)[torch.arange(len(x), device=x.device), k]

class VideoTransformer(nn.Module):
    """Encoder over the already generated slices, decoder over the current slice (slide "Scaling Autoregressive Video
    Models"); both stacks of block-local layers with block shapes cycled from cfg.blocks."""
    def __init__(self, cfg, shape):
        super().__init__()
        T, C, H, W = shape
        self.s, self.C, self.cond_frames, D = triple(cfg.subscale, "subscale"), C, cfg.cond_frames, cfg.width
        if T % self.s[0] or H % self.s[1] or W % self.s[2]:
            common.fail(f"--subscale {cfg.subscale} does not divide the video {T}x{H}x{W} (frames x height x width)")
        if D % cfg.heads:
            common.fail(f"--width {D} is not divisible by --heads {cfg.heads}")
        self.video, self.grid = (T, H, W), (T // self.s[0], H // self.s[1], W // self.s[2])
        self.S, self.n = math.prod(self.s), math.prod(self.grid)
        blocks = [triple(b, "blocks") for b in cfg.blocks.split(",")]
        t, h, w = torch.meshgrid(*(torch.arange(n) for n in self.video), indexing="ij")
        slice_id = ((t % self.s[0]) * self.s[1] + h % self.s[1]) * self.s[2] + w % self.s[2]  # (T, H, W): the slice of each pixel
        self.register_buffer("slice_id", slice_id, persistent=False)
        self.register_buffer("given", t[:, :1, :1] < cfg.cond_frames, persistent=False)  # (T, 1, 1): frames given
        self.enc_emb = nn.Parameter(torch.randn(C, V + 1, D) * 0.02)  # value V: "not generated yet"
        self.enc_conv = nn.Conv3d(D, D, self.s, stride=self.s)  # one output per slice position
        self.dec_emb, self.chan_emb = (nn.Parameter(torch.randn(C, V, D) * 0.02) for _ in range(2))
        self.enc_pos, self.dec_pos = PosEmbed(self.grid, D), PosEmbed(self.grid, D)
        self.enc_slice, self.dec_slice = nn.Embedding(self.S, D), nn.Embedding(self.S, D)
        self.start, self.chan_id = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(C, D))
        layer = lambda i, causal: Layer(D, cfg.heads, blocks[i % len(blocks)], causal, self.grid, cfg.dropout)
        self.enc = nn.ModuleList(layer(i, False) for i in range(cfg.enc_layers))
        self.dec = nn.ModuleList(layer(i, True) for i in range(cfg.dec_layers))
        self.enc_ln, self.dec_ln, self.head = nn.LayerNorm(D), nn.LayerNorm(D), nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, V))
        nn.init.zeros_(self.head[-1].weight), nn.init.zeros_(self.head[-1].bias)  # uniform logits at the start: 8 bits/dim
    def encode(self, x, k):
        """The video x (B, T, H, W, C) with every slice >= k[b] masked (the first cond_frames frames stay) ->
        (B, T', H', W', D), a context for every position of slice k."""
        seen = ((self.slice_id < k[:, None, None, None]) | self.given)[..., None]  # (B, T, H, W, 1)
        if x.is_floating_point():  # one-hot (..., C, V): the masked value is the extra last class
            x = torch.where(seen[..., None], F.pad(x, (0, 1)), F.one_hot(torch.tensor(V), V + 1).to(x))
        else:
            x = torch.where(seen, x, V)
        e = embed_each(x, self.enc_emb).sum(-2).permute(0, 4, 1, 2, 3)  # (B, D, T, H, W)
        h = self.enc_conv(e).permute(0, 2, 3, 4, 1) + self.enc_pos() + self.enc_slice(k)[:, None, None, None]  # (B, T', H', W', D)
        for layer in self.enc:
            h = layer(h)
        return self.enc_ln(h)
    def dec_input(self, xs, k, context):
        """Slice pixels xs (B, T', H', W', C[, V]) shifted by one position in raster order, + positions, slice, context."""
        e = embed_each(xs, self.dec_emb).sum(-2).flatten(1, 3)  # (B, n, D)
        e = torch.cat([self.start.expand(len(e), 1, -1), e[:, :-1]], 1).view(context.shape)
        return e + self.dec_pos() + self.dec_slice(k)[:, None, None, None] + context
    def logits(self, h, xs):
        """Channel c of each pixel from the decoder's output h (..., D) and the channels before it: (..., C, V)."""
        prev = F.pad(embed_each(xs, self.chan_emb)[..., :-1, :].cumsum(-2), (0, 0, 1, 0))  # (..., C, D): sum over c' < c
        return self.head(h[..., None, :] + prev + self.chan_id)
    def forward(self, x, k):
        """x: videos (B, T, H, W, C) long (or one-hot floats (..., C, V)), k: slice index (B,) -> logits of slice k
        (B, T', H', W', C, V), each depending only on x_<k, the earlier pixels of slice k and earlier channels."""
        xs = take_slice(x, k, self.s)
        h = self.dec_input(xs, k, self.encode(x, k))
        for layer in self.dec:
            h = layer(h)
        return self.logits(self.dec_ln(h), xs)
    def modelled(self, k):  # (B, T', 1, 1): the slice positions whose pixels are modelled (not given frames)
        frame = torch.arange(self.grid[0], device=k.device) * self.s[0] + k[:, None] // (self.s[1] * self.s[2])  # (B, T')
        return (frame >= self.cond_frames)[..., None, None]

# ----------------------------------------------------------------------------- networks: VideoGPT
class AxialBlock(nn.Module):
    """Multi-head self-attention along time, height and width separately, the three outputs summed (VideoGPT)."""
    def __init__(self, width, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(3))
        self.proj = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
    def forward(self, x):  # (B, D, T, H, W)
        h, out = x.permute(0, 2, 3, 4, 1), 0  # (B, T, H, W, D)
        for axis, (qkv, proj) in enumerate(zip(self.qkv, self.proj), 1):
            a = h.movedim(axis, -2)  # (B, ., ., L, D): attention along this axis
            q, k, v = qkv(a).unflatten(-1, (3, self.heads, -1)).movedim(-3, 0).transpose(-2, -3)  # 3 x (B, ., ., nh, L, hs)
            y = F.scaled_dot_product_attention(q, k, v).transpose(-2, -3).flatten(-2)  # (B, ., ., L, D)
            out = out + proj(y).movedim(-2, axis)
        return out.permute(0, 4, 1, 2, 3)

class AttnResBlock(nn.Module):
    """x + [BN, ReLU, conv3 (D -> D/2), BN, ReLU, conv1 (D/2 -> D), BN, ReLU, axial attention](x) (VideoGPT)."""
    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm3d(d), nn.ReLU(), nn.Conv3d(d, d // 2, 3, padding=1, bias=False), nn.BatchNorm3d(d // 2),
                                 nn.ReLU(), nn.Conv3d(d // 2, d, 1, bias=False), nn.BatchNorm3d(d), nn.ReLU(), AxialBlock(d))
    def forward(self, x):
        return x + self.net(x)

def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of 8-bit values x in [-1, 1] under a logistic discretized into bins of width 2/255, the edge bins
    extended to -inf / +inf (PixelCNN++); log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + logsigmoid(-b) + log(1 - e^(b - a))."""
    inv_s = torch.exp(-log_scale.clamp(min=-7.0))
    plus, minus = inv_s * (x - mean + 1 / 255), inv_s * (x - mean - 1 / 255)
    mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(-torch.expm1(minus - plus))
    return torch.where(x < -0.999, F.logsigmoid(plus), torch.where(x > 0.999, F.logsigmoid(-minus), mid))

def perplexity(n):  # exp(H(p)), p = n / sum(n): K for uniform use of K codes, 1 for a single code
    p = n / n.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())

class Codebook(nn.Module):
    """VideoGPT's EMA codebook: N_i <- g N_i + (1 - g) n_i, m_i <- g m_i + (1 - g) sum_{z -> i} z, e_i = m_i / N_i (N
    Laplace-smoothed); codes start as first-batch encoder outputs; codes with N_i < 1 restart at random ones."""
    def __init__(self, K, D, decay=0.99, eps=1e-7):
        super().__init__()
        self.K, self.decay, self.eps = K, decay, eps
        for name, v in (("embed", torch.randn(K, D)), ("N", torch.ones(K)), ("m", torch.randn(K, D)), ("ready", torch.zeros(()))):
            self.register_buffer(name, v)
        self.register_buffer("restarts", torch.zeros(()), persistent=False)
    def forward(self, z_e):
        """z_e (B, D, t, h, w) -> z_q (B, D, t, h, w), codes (B, t, h, w), counts n (K,)."""
        flat = up(z_e.movedim(1, -1).reshape(-1, z_e.shape[1])).detach()  # (M, D)
        if self.training:
            self.init_and_restart(flat, first=True)
        with torch.autocast(flat.device.type, enabled=False):
            idx = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.T + self.embed.pow(2).sum(1)).argmin(1)  # nearest code
        n = flat.new_zeros(self.K).index_add_(0, idx, flat.new_ones(len(idx)))  # counts n_i (bincount would sync on CUDA)
        z_q = F.embedding(idx, self.embed).view(*z_e.shape[:1], *z_e.shape[2:], -1).movedim(-1, 1)
        if self.training:
            self.ema(flat, idx, n)
        return z_q.to(z_e.dtype), idx.view(z_e.shape[:1] + z_e.shape[2:]), n
    @torch.no_grad()
    def init_and_restart(self, flat, first):
        new = flat[torch.randint(len(flat), (self.K,), device=flat.device)]  # (K, D) random encoder outputs
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(new, 0)
        swap = (self.ready == 0).expand(self.K) if first else self.N < 1  # the first batch: all codes; later: the unused ones
        if not first:
            self.restarts.copy_(swap.sum())  # codes restarted by this step (logged)
        self.embed.copy_(torch.where(swap[:, None], new, self.embed))
        self.m.copy_(torch.where(swap[:, None], new, self.m))
        self.N.copy_(torch.where(swap, 1.0, self.N))
        self.ready.fill_(1)
    @torch.no_grad()
    def ema(self, flat, idx, n):
        sums = torch.zeros_like(self.m).index_add_(0, idx, flat)
        if dist.is_initialized() and dist.get_world_size() > 1:  # the statistics of the global batch
            dist.all_reduce(n := n.clone())
            dist.all_reduce(sums)
        g = self.decay
        self.N.mul_(g).add_(n, alpha=1 - g)
        self.m.mul_(g).add_(sums, alpha=1 - g)
        total = self.N.sum()
        self.embed.copy_(self.m / ((self.N + self.eps) / (total + self.K * self.eps) * total)[:, None])
        self.init_and_restart(flat, first=False)

class VQVAE3d(nn.Module):
    """VideoGPT's VQ-VAE: strided 3D convolutions + axial-attention residual blocks, the codebook, the mirror image."""
    def __init__(self, cfg, shape):
        super().__init__()
        T, C, H, W = shape
        self.video, self.C, self.beta = (T, H, W), C, cfg.beta
        down = triple(cfg.down, "down")
        n_down = [int(math.log2(d)) for d in down]
        if any(2 ** n != d for n, d in zip(n_down, down)) or any(v % d for v, d in zip(self.video, down)):
            common.fail(f"--down {cfg.down}: needs powers of 2 that divide the video {T}x{H}x{W}")
        self.code_grid, d = tuple(v // f for v, f in zip(self.video, down)), cfg.hidden
        conv = lambda i, c_in, c_out, tr=False: (nn.ConvTranspose3d if tr else nn.Conv3d)(
            c_in, c_out, tuple(4 if i < n else 3 for n in n_down), tuple(2 if i < n else 1 for n in n_down), 1)
        enc, dec = [], []
        for i in range(max(n_down)):  # stage i halves the axes that still need it
            enc += [conv(i, C if i == 0 else d, d), nn.ReLU()]
            dec = [conv(i, d, 2 * C if i == 0 else d, tr=True)] + ([nn.ReLU()] if i else []) + dec
        stack = lambda: [*(AttnResBlock(d) for _ in range(cfg.n_res)), nn.BatchNorm3d(d), nn.ReLU()]
        self.enc = nn.Sequential(*enc, nn.Conv3d(d, d, 3, padding=1), *stack(), nn.Conv3d(d, cfg.code_dim, 1))
        self.dec = nn.Sequential(nn.Conv3d(cfg.code_dim, d, 1), *stack(), *dec)
        self.codebook = Codebook(cfg.codes, cfg.code_dim, cfg.decay)
    def encode(self, x):  # x (B, C, T, H, W) in [0, 1] -> z_e, z_q, codes, counts
        z_e = self.enc(2 * x - 1)
        return (z_e, *self.codebook(z_e))
    def decode(self, z):  # (B, D, t, h, w) -> the logistic's (mean, log scale), each (B, C, T, H, W), fp32
        return up(self.dec(z)).chunk(2, 1)
    def decode_codes(self, codes):  # (B, t, h, w) -> the mean video (B, C, T, H, W) in [0, 1]
        return ((self.decode(F.embedding(codes, self.codebook.embed).movedim(-1, 1))[0] + 1) / 2).clamp(0, 1)
    def forward(self, x):  # the loss, so that DDP sees one forward
        return vqvae_loss(self, x)

class Prior(nn.Module):
    """iGPT-style prior over the flattened code volume: token + per-axis position embeddings, causal layers whose
    one block is the whole volume (full attention), LN, a head to the K codes. Input id K is the start token."""
    def __init__(self, cfg, grid):
        super().__init__()
        self.K, self.grid = cfg.codes, tuple(grid)
        self.tok, self.pos = nn.Embedding(cfg.codes + 1, cfg.width), PosEmbed(grid, cfg.width)
        self.layers = nn.ModuleList(Layer(cfg.width, cfg.heads, grid, True, grid, cfg.dropout) for _ in range(cfg.prior_layers))
        self.ln, self.head = nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.codes)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # VideoGPT: fc_out starts at zero
    def forward(self, z):  # codes (B, t, h, w) -> logits (B, t, h, w, K) of z_i given z_<i (raster order)
        h = self.tok(torch.cat([torch.full_like(z.flatten(1)[:, :1], self.K), z.flatten(1)[:, :-1]], 1).view(z.shape)) + self.pos()
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln(h))

# ----------------------------------------------------------------------------- objective
def to_video(x, factor):
    """Batches' videos (B, T, C, S, S) in [0, 1] -> 8-bit values (B, T, H, W, C) long, average-pooled by factor."""
    if factor > 1:
        x = F.avg_pool2d(x.flatten(0, 1) * 255, factor).unflatten(0, x.shape[:2]) / 255
    return (x * 255).round().long().permute(0, 1, 3, 4, 2)

# slide "Scaling Autoregressive Video Models": -log p(x_k | x_<k) = -sum_{i, c} log p(x_{k,i,c} | ...), nats (B,)
def slice_nll(model, x, k, net=None):
    logits = up((net or model)(x, k))  # (B, T', H', W', C, V)
    ce = F.cross_entropy(logits.movedim(-1, 1), take_slice(x, k, model.s), reduction="none")  # (B, T', H', W', C)
    return (ce * model.modelled(k)[..., None]).flatten(1).sum(1)

def modelled_dims(model):
    return (math.prod(model.video) - model.cond_frames * model.video[1] * model.video[2]) * model.C

# -log p(x) estimated from one random slice per video: S * (-log p(x_k | x_<k)), k ~ U{0..S-1}; per sub-pixel (nats)
def transformer_loss(model, x, net=None):
    k = torch.randint(model.S, (len(x),), device=x.device)
    nll = model.S * slice_nll(model, x, k, net)
    dims = modelled_dims(model)
    return nll.mean() / dims, {"loss": nll.mean() / dims, "bpd": common.bits_per_dim(nll.mean(), dims)}

# slide "VideoGPT" step 1: -log p(x | z_q(x)) + beta ||z_e - sg(e)||^2 (EMA codebook); decoder reads z_q straight-through
def vqvae_loss(model, x):
    z_e, z_q, codes, n = model.encode(x)
    mean, log_scale = model.decode(z_e + (z_q - z_e).detach())  # straight-through: value z_q, gradient to z_e
    recon = -discretized_logistic_log_prob(2 * x - 1, mean, log_scale).flatten(1).sum(1).mean()
    commit = (z_e.float() - z_q.float().detach()).pow(2).flatten(1).sum(1).mean()
    dims = x[0].numel()
    return recon + model.beta * commit, {"loss": recon + model.beta * commit, "recon_bpd": common.bits_per_dim(recon, dims),
                                         "commit": commit, "mse": (((mean + 1) / 2).clamp(0, 1) - x).pow(2).mean(),
                                         "ppl": perplexity(n), "restarts": model.codebook.restarts}

# slide "VideoGPT" step 2: -log p(z) = -sum_i log p(z_i | z_<i), nats per video (B,)
def prior_nll(prior, z, net=None):
    return F.cross_entropy(up((net or prior)(z)).movedim(-1, 1), z, reduction="none").flatten(1).sum(1)

# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_transformer(model, n, device, given=None, cache=True, generator=None, temperature=1.0):
    """Slices k = 0..S-1 in order: one encoder pass over the slices so far, then the slice's pixels in raster order,
    channels in order, x ~ softmax(logits / temperature); `cache`: each decoder layer keeps the slice's keys / values
    (one position per pixel), else the whole network runs per sub-pixel. given (n, F, H, W, C): kept fixed."""
    (T, H, W), C, s = model.video, model.C, model.s
    x = torch.zeros(n, T, H, W, C, dtype=torch.long, device=device)
    fixed = torch.zeros(T, H, W, dtype=torch.bool, device=device)
    if given is not None:
        x[:, :given.shape[1]], fixed[:given.shape[1]] = given, True
    fixed = subscale_split(fixed[None], s)[0].flatten(1, 3).tolist()  # (S, n_pos): kept, not drawn (a list: no syncs)
    for k in range(model.S):
        kk = torch.full((n,), k, device=device)
        slices = subscale_split(x, s)  # (n, S, T', H', W', C)
        xs = slices[:, k].flatten(1, 3)  # (n, n_pos, C) this slice, filled in place below
        if cache:
            base = (model.dec_pos() + model.dec_slice(kk)[:, None, None, None] + model.encode(x, kk)).flatten(1, 3)  # (n, n_pos, D)
            kv = [layer.new_cache(n, base) for layer in model.dec]
        for i in range(model.n):
            if cache:  # input: start or the previous pixel's embedding, + position, slice, context
                h = base[:, i] + (model.start if i == 0 else embed_each(xs[:, i - 1], model.dec_emb).sum(-2))
                for layer, c in zip(model.dec, kv):
                    h = layer.step(h, i, c)
                h = model.dec_ln(h)
            for c in range(C if not fixed[k][i] else 0):
                if cache:
                    logits = model.logits(h, xs[:, i])[:, c].float()
                else:
                    slices[:, k] = xs.view(slices[:, k].shape)
                    logits = model(subscale_merge(slices, s), kk).flatten(1, 3)[:, i, c].float()
                xs[:, i, c] = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        slices[:, k] = xs.view(slices[:, k].shape)
        x = subscale_merge(slices, s)
    return x

@torch.no_grad()
def sample_codes(prior, n, device, prefix=None, generator=None, temperature=1.0):
    """Ancestral sampling of the code volume in raster order, key / value cached; prefix (n, p): the first p codes given."""
    z, p = torch.zeros(n, math.prod(prior.grid), dtype=torch.long, device=device), 0 if prefix is None else prefix.shape[1]
    z[:, :p] = prefix if p else z[:, :0]
    pos = prior.pos().flatten(0, 2)  # (n_codes, D)
    kv = [layer.new_cache(n, pos) for layer in prior.layers]
    for i in range(z.shape[1]):
        h = prior.tok(z[:, i - 1] if i else torch.full_like(z[:, 0], prior.K)) + pos[i]
        for layer, c in zip(prior.layers, kv):
            h = layer.step(h, i, c)
        if i >= p:
            logits = prior.head(prior.ln(h)).float()
            z[:, i] = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
    return z.view(n, *prior.grid)

def as_frames(v):  # (n, T, H, W, C) long -> (n, T, C, H, W) in [0, 1]
    return v.permute(0, 1, 4, 2, 3).float() / 255

@torch.no_grad()
def generate(model, prior, n, device, given=None, temperature=1.0):
    """n videos (n, T, C, H, W) in [0, 1]; given (n, F, H, W, C) long: continuations of those first frames."""
    if prior is None:
        return as_frames(sample_transformer(model, n, device, given, temperature=temperature))
    prefix = None
    if given is not None:  # the codes of the latent time steps that the given frames cover (later frames zero)
        x = torch.cat([given, given.new_zeros(n, model.video[0] - given.shape[1], *given.shape[2:])], 1)  # (n, T, H, W, C)
        prefix = model.encode(as_frames(x).transpose(1, 2))[2][:, :-(-given.shape[1] * model.code_grid[0] // model.video[0])].flatten(1)
    return model.decode_codes(sample_codes(prior, n, device, prefix, temperature=temperature)).transpose(1, 2)

def first_frames(model, x, n):  # a model trained with --cond-frames F samples given F first frames: test videos x's (cycled)
    f = getattr(model, "cond_frames", 0)
    return x[torch.arange(n, device=x.device) % len(x), :f] if f else None

def save_videos(model, prior, x, cfg, out, step):
    """samples_<step>.png / .gif (a video per row; a --cond-frames model given test videos' first frames) and
    continuations_<step>.png (per test video: the original, then 2 continuations of its first max(1, F) frames)."""
    model.eval(), prior.eval() if prior is not None else None
    videos = generate(model, prior, cfg.n_samples, x.device, first_frames(model, x, cfg.n_samples), cfg.temperature)  # (n, T, C, H, W)
    common.save_grid(videos.flatten(0, 1), out / f"samples_{step}.png", nrow=videos.shape[1])
    save_gif(videos, out / f"samples_{step}.gif")
    f, given = max(1, cfg.cond_frames), x[:4]
    rows = [as_frames(given)] + [generate(model, prior, len(given), x.device, given[:, :f], cfg.temperature) for _ in range(2)]
    common.save_grid(torch.stack(rows, 1).flatten(0, 2), out / f"continuations_{step}.png", nrow=videos.shape[1])
    model.train(), prior.train() if prior is not None else None

def save_gif(videos, path, ms=200):
    """Videos (n, T, C, H, W) in [0, 1] -> an animated GIF, the videos side by side (PIL through torchvision)."""
    frames = [torchvision.transforms.functional.to_pil_image(torchvision.utils.make_grid(videos[:, t].float().cpu(), nrow=len(videos), padding=1))
              for t in range(videos.shape[1])]
    with common.writing(path):
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)

# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, prior, data, cfg, run, step, batch_size=25):
    """transformer: exact test NLL, all S slices of every test video, and the bits/dim of each slice (the first has no
    context). videogpt: -log p(x | z_q(x)), MSE, codebook perplexity and unused codes, and with the prior the bound."""
    model.eval(), prior.eval() if prior is not None else None
    nll, per_slice, n_test, counts, mse = [], [], 0, 0, []
    for xb in common.test_batches(data, cfg, run.device, batch_size, "exact NLL of all slices" if cfg.model == "transformer" else "the bound"):
        x = to_video(xb, 1)  # (B, T, H, W, C): the test set is pooled already
        n_test += len(x)
        with run.autocast():
            if cfg.model == "transformer":
                per_slice.append(torch.stack([slice_nll(model, x, torch.full((len(x),), k, device=x.device)) for k in range(model.S)], 1))
                nll.append(per_slice[-1].sum(1))  # (B,) from the S slices' (B, S)
            else:
                v = as_frames(x).transpose(1, 2)  # (B, C, T, H, W)
                _, z_q, codes, n = model.encode(v)
                mean, log_scale = model.decode(z_q)
                rec = -discretized_logistic_log_prob(2 * v - 1, mean, log_scale).flatten(1).sum(1)
                nll.append(rec + (prior_nll(prior, codes) if prior is not None else 0))
                per_slice.append(rec)
                counts = counts + n
                mse.append((((mean + 1) / 2).clamp(0, 1) - v).pow(2).flatten(1).mean(1))
    model.train(), prior.train() if prior is not None else None
    nll = torch.cat(nll).mean().item()
    if cfg.model == "transformer":
        dims = modelled_dims(model)
        per, ks = torch.cat(per_slice).mean(0).tolist(), torch.arange(model.S, device=run.device)
        dims_k = (model.modelled(ks).flatten(1).sum(1) * model.grid[1] * model.grid[2] * model.C).tolist()  # modelled sub-pixels per slice
        return common.eval_record(step, common.bits_per_dim(nll, dims), "bpd", "exact", n_test, nll_nats=nll,
                                  bpd_per_slice=[round(common.bits_per_dim(p, d), 4) if d else None for p, d in zip(per, dims_k)],
                                  dims=dims, cond_frames=model.cond_frames, subscale=list(model.s))
    dims, rec = math.prod(model.video) * model.C, torch.cat(per_slice).mean().item()
    extras = dict(recon_bpd=common.bits_per_dim(rec, dims), mse=torch.cat(mse).mean().item(), perplexity=perplexity(counts).item(),
                  unused_codes=int((counts == 0).sum()), codes=model.codebook.K, code_grid=list(model.code_grid))
    if prior is None:  # no prior yet: the bound under the uniform prior p(z) = K^-n_codes
        uniform = rec + math.prod(model.code_grid) * math.log(model.codebook.K)
        return common.eval_record(step, common.bits_per_dim(uniform, dims), "bpd", "bound", n_test, prior="uniform", **extras)
    return common.eval_record(step, common.bits_per_dim(nll, dims), "bpd", "bound", n_test, prior="learned",
                              prior_bpd=common.bits_per_dim(nll - rec, dims), **extras)

# ----------------------------------------------------------------------------- train
def prepare(cfg):
    """The moving-digit data set with its test videos average-pooled by cfg.downsample; checks of the flags."""
    data = common.load_data(cfg)
    if data.kind != "video":
        common.fail(f"video_ar.py models videos; --dataset {cfg.dataset} holds {data.kind} data (accepted: {', '.join(common.VIDEO_SETS)})")
    T, C, S, _ = data.shape
    if cfg.binarize:
        common.fail("--binarize: video_ar.py models 8-bit videos (a softmax over 256 values per sub-pixel); drop the flag")
    if cfg.downsample < 1 or S % cfg.downsample:
        common.fail(f"--downsample {cfg.downsample} must be >= 1 and divide --frame-size {S}")
    bad = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("enc_layers", "dec_layers", "width", "heads", "hidden", "n_res", "codes",
                                                                  "code_dim", "prior_steps", "prior_layers", "n_samples") if getattr(cfg, k) < 1]
    bad += [f"--cond-frames {cfg.cond_frames}"] * (not 0 <= cfg.cond_frames < T) + [f"--warmup {cfg.warmup}"] * (cfg.warmup < 0)
    bad += [f"--{k} {getattr(cfg, k)}" for k in ("dropout", "decay") if not 0 <= getattr(cfg, k) < 1]
    bad += [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("beta", "prior_lr", "temperature") if not getattr(cfg, k) > 0]
    if bad:
        common.fail(f"{bad[0]} out of range; accepted: layers, widths, codes, steps, --n-samples >= 1; 0 <= --cond-frames < --frames; "
                    "--warmup >= 0; 0 <= --dropout, --decay < 1; --beta, --prior-lr, --temperature > 0")
    test = to_video(data.test.float() / 255, cfg.downsample).permute(0, 1, 4, 2, 3).to(torch.uint8)  # (N, T, C, H, W)
    return common.Data(data.name, "video", tuple(test.shape[1:]), data.train, test)

def fit(cfg, run, method, module, loss_fn, batches, name, extra, on_eval, on_images):
    """The training loop shared by the three models: warm-up then constant lr, guarded updates, log, checkpoints."""
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, module, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    step = common.resume(cfg, run, method, module, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(module, run, cfg), common.Logger(cfg, run, step, update)
    run.print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.3f}M parameters")
    checkpoint = lambda: common.save_checkpoint(cfg, run, method, step, model=module, optimizer=opt, batches=batches, update=update, **extra)
    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:  # linear warm-up, then constant (a python float: no sync)
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            x = next(batches)
            with run.autocast():
                loss, terms = loss_fn(net, x)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(on_eval(step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                on_images(step)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(module, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        on_images(step)
        log.write(on_eval(step))

def prior_path(cfg):
    return os.path.join(os.path.dirname(cfg.ckpt) or ".", "prior.pt")

def train(cfg):
    data = prepare(cfg)
    run = common.setup(cfg, METHOD)
    full = common.Data(data.name, "video", (cfg.frames, 1, cfg.frame_size, cfg.frame_size), data.train, data.test)  # pooled per batch
    batches = common.Batches(full, cfg, run)
    fixed = to_video(next(common.test_batches(data, cfg, run.device, 4)), 1)
    extra = dict(shape=list(data.shape))
    if cfg.model == "transformer":
        model = VideoTransformer(cfg, data.shape).to(run.device)
        fit(cfg, run, METHOD, model, lambda net, x: transformer_loss(model, to_video(x, cfg.downsample), net), batches,
            f"Video Transformer (video {'x'.join(map(str, model.video))}, subscale {model.s}: {model.S} slices of "
            f"{'x'.join(map(str, model.grid))}, {len(model.enc)} + {len(model.dec)} layers of width {cfg.width})", extra,
            lambda step: evaluate(model, None, data, cfg, run, step), lambda step: save_videos(model, None, fixed, cfg, run.out, step))
        return model, None
    model = VQVAE3d(cfg, data.shape).to(run.device)
    vq = lambda net, x: net(as_frames(to_video(x, cfg.downsample)).transpose(1, 2))
    if cfg.stage in ("all", "ae"):
        fit(cfg, run, METHOD, model, vq, batches, f"VQ-VAE (codes {'x'.join(map(str, model.code_grid))}, K = {cfg.codes}, "
            f"D = {cfg.code_dim})", extra, lambda step: evaluate(model, None, data, cfg, run, step), lambda step: None)
        if cfg.stage == "ae":
            return model, None
    else:
        ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
        common.load_model_state(model, ckpt["model"], cfg.ckpt)
    model.eval().requires_grad_(False)  # frozen: the codes of a video never change
    pcfg = replace(cfg, steps=cfg.prior_steps, lr=cfg.prior_lr, ckpt=prior_path(cfg))
    prior = Prior(cfg, model.code_grid).to(run.device)
    codes = lambda x: model.encode(as_frames(to_video(x, cfg.downsample)).transpose(1, 2))[2]
    def prior_loss(net, x):
        nll = prior_nll(prior, codes(x), net).mean()
        return nll / math.prod(model.code_grid), {"loss": nll / math.prod(model.code_grid), "prior_bpd": common.bits_per_dim(nll, math.prod(data.shape))}
    fit(pcfg, run, PRIOR, prior, prior_loss, common.Batches(full, pcfg, run),
        f"GPT prior over {model.code_grid} codes ({cfg.prior_layers} layers of width {cfg.width})", extra,
        lambda step: evaluate(model, prior, data, cfg, run, step), lambda step: save_videos(model, prior, fixed, cfg, run.out, step))
    return model, prior

# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    bair = BAIR["videogpt" if any(a in ("--model=videogpt", "videogpt") for a in argv) else "transformer"]
    presets = {k: {**v, **bair} for k, v in PRESETS.items()} if "--bair" in argv else PRESETS
    cfg = common.parse_config(Config, presets, METHOD, argv, accept=(PRIOR,))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = (VideoTransformer if cfg.model == "transformer" else VQVAE3d)(cfg, tuple(ckpt["shape"])).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    prior = Prior(cfg, model.code_grid).to(run.device).eval() if cfg.model == "videogpt" and os.path.isfile(prior_path(cfg)) else None
    if prior is not None:
        common.load_model_state(prior, common.load_checkpoint(prior_path(cfg), (PRIOR,))["model"], prior_path(cfg))
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        if cfg.model == "videogpt" and prior is None:
            common.fail(f"--sample needs the trained prior {prior_path(cfg)} (run --stage prior)")
        given = first_frames(model, to_video(next(common.test_batches(prepare(cfg), cfg, run.device, cfg.sample)), 1), cfg.sample) \
            if getattr(model, "cond_frames", 0) else None  # (the test videos' first frames)
        t = time.time()
        with run.autocast():
            videos = generate(model, prior, cfg.sample, run.device, given, cfg.temperature).float().cpu()
        dt = time.time() - t
        common.save_grid(videos.flatten(0, 1), run.out / "sample.png", nrow=videos.shape[1])
        save_gif(videos, run.out / "sample.gif")
        passes = (f"{model.S} encoder passes + {model.S * model.n} cached decoder steps + {modelled_dims(model)} heads" if prior is None
                  else f"{math.prod(model.code_grid)} cached prior steps + 1 decoder pass")
        print(f"{cfg.sample} videos in {dt:.3f}s ({dt / cfg.sample:.3f} s/video; {passes} per batch) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, prior, prepare(cfg), cfg, run, ckpt["step"]))

if __name__ == "__main__":
    main()
