"""PixelCNN and PixelRNN (Row LSTM, Diagonal BiLSTM): exact autoregressive likelihoods over pixels.

van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent Neural Networks", arXiv 1601.06759.
Slides: "Pixel Convolutional/Recurrent Neural Network (PixelCNN/PixelRNN)" (Pixel CNN, Row LSTM, Diagonal BiLSTM).

An image x is a sequence of n x n pixels in raster order, each pixel three sub-pixels R, G, B, and

    p(x) = prod_k p(x_k | x_<k)                                           (slides: p(x_k | x_<k))
    p(x_i,R | x_<i) p(x_i,G | x_<i, x_i,R) p(x_i,B | x_<i, x_i,R, x_i,G)  (colour order inside a pixel)
    p(x_k | x_<k) = softmax over 256 values (8-bit data) or a Bernoulli (binarized data)
The colour order is the paper's R, G, B (eq. 2; sec. 3.4: G sees R, B sees R and G), the one the masks below
implement. The slides ("each RGB pixel is generated autoregressively") write p(x_k,R, x_k,B, x_k,G | x_<k) =
p(x_k,R | x_<k) p(x_k,B | x_<k, x_k,R) p(x_k,G | x_<k, x_k,R, x_k,B), a typo for R, G, B (that order would
be a valid factorization too, but it is not the paper's).

Every network reads the whole image at once and is made causal by masks: the first layer is a 7x7
convolution of mask type A (a sub-pixel never sees itself), later ones of type B (a feature group sees
itself); features are split in C groups (R, G, B) so that group c only sees input groups < c (A) or <= c (B).
  - pixelcnn:   7x7 mask A, then residual blocks 2h -> 1x1 -> h -> 3x3 mask B -> h -> 1x1 -> 2h (+ input).
  - rowlstm:    per row i: [o, f, i, g] = sigma(K^ss (*) h_{i-1} + K^is (*) x_i), c_i = f . c_{i-1} + i . g,
                h_i = o . tanh(c_i); K^is a 1 x k masked (B) convolution, K^ss an unmasked 1D convolution over the
                previous row (k = 3): a triangular receptive field above the pixel. Rows run one after another,
                vectorised over batch and columns. Kernel sizes here are height x width (PyTorch's order): K^is
                is (1, k), one row tall and k pixels along the row, K^ss a length-k kernel along the previous row.
                The paper (sec. 3.1) gives the Row LSTM's one-dimensional convolution, the input-to-state one by
                name, the size "k x 1" (k >= 3), the length along the row first: the same kernels. (Its Diagonal
                BiLSTM's column-wise "2 x 1", sec. 3.2, is 2 along the column: (2, 1) in PyTorch's order.)
  - diagbilstm: the input is skewed (row i shifted right by i); K^is a 1x1 mask-B convolution, K^ss a 2x1
                convolution over the previous column of the skewed map, i.e. the left and upper neighbours;
                columns (= diagonals) run one after another, vectorised over batch and rows. A second direction
                runs on the mirrored image and its output is shifted down one row before it is added, so no
                future pixel leaks; together they see the whole context x_<k but one sub-pixel: for a pixel in
                column 0, the last sub-pixel of the row above (reached only through mask-A stem features of later
                positions; the same holds for the paper's layout as read here; tests pin the exception down).
  Both LSTMs have a 1x1 convolution h -> 2h and a residual connection around each layer; all three end with
  ReLU, 1x1 mask B, ReLU, 1x1 mask B -> C x 256 logits (C x 1 for Bernoulli).

Test NLL is exact: bits/dim of the 8-bit data (-log2 p(x) / D, no dequantization) or nats per image for
binarized data. The loss of a batch is one forward pass; sampling needs H*W*C forward passes per batch of
images (no caching of states), pixel by pixel and channel by channel.

Presets: `mnist` (binarized; the paper's 7 layers, h = 16 of its Diagonal BiLSTM; paper: PixelCNN 81.30,
Row LSTM 80.54, Diagonal BiLSTM 79.20 nats). `cifar10`: 12 layers, h = 128 (paper: 3.14 / 3.07 / 3.00 bpd);
not confirmed from the paper text here: its PixelCNN CIFAR model may have 15 layers, its optimizer (RMSProp
in the paper vs Adam here), batch size and learning rate schedule. `fashion-mnist`: 4 layers, h = 16, a CPU demo.

Run:
    python pixelcnn.py                                         # fashion-mnist, PixelCNN, 8-bit softmax
    python pixelcnn.py --arch diagbilstm --dataset mnist       # binarized MNIST, nats
    python pixelcnn.py --arch rowlstm --dataset cifar10        # a GPU run
    python pixelcnn.py --eval --ckpt runs/pixelcnn/fashion-mnist/ckpt.pt

Result (fashion-mnist, one small budget for all three: 200 steps of batch 32, h = 16, 4 layers, test NLL on the
first 500 test images; CPU, 1 thread, on a shared 2-core machine, so times are rough):
    python pixelcnn.py --arch ARCH --steps 200 --batch-size 32 --eval-n 500 --log-every 50 --n-samples 4 --n-complete 4
    python pixelcnn.py --sample 4 --ckpt runs/pixelcnn/fashion-mnist/ckpt.pt      (4 images, 784 forward passes)
  arch         test NLL (bpd, exact)   s/step   s per sampled image
  pixelcnn     3.847                   ~0.29    1.90
  rowlstm      3.807                   ~0.83    6.29
  diagbilstm   3.751                   ~1.4     9.54
  Far from converged (200 steps); the preset runs (2000-step fashion-mnist demo, mnist in nats, cifar10 on a GPU)
  and the CUDA / bf16 path are not yet measured.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "pixelcnn"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    arch: str = common.choice("pixelcnn", "rowlstm", "diagbilstm")  # network: masked CNN, Row LSTM or Diagonal BiLSTM
    hidden: int = 16  # h: LSTM state / residual bottleneck width; features between layers have 2h channels
    layers: int = 4  # residual blocks or LSTM layers after the 7x7 mask-A convolution
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    n_samples: int = 16  # images sampled into samples_<step>.png (H*W*C forward passes each batch)
    n_complete: int = 8  # test images whose lower half is completed into complete_<step>.png


PRESETS = {
    "fashion-mnist": dict(arch="pixelcnn", hidden=16, layers=4, steps=2000, batch_size=32, lr=1e-3, log_every=100,
                          ckpt_every=500, eval_n=500),
    "mnist": dict(binarize=True, hidden=16, layers=7, steps=200_000, batch_size=16, lr=1e-3, log_every=500,
                  ckpt_every=5000, eval_every=20_000, n_samples=64),
    "cifar10": dict(hidden=128, layers=12, steps=200_000, batch_size=16, lr=1e-3, log_every=500, ckpt_every=5000,
                    eval_every=20_000, eval_n=2000, n_samples=64),
}


# ----------------------------------------------------------------------------- networks
def groups(n, C):
    """Colour group (0 = R, 1 = G, 2 = B) of each of n channels split in C contiguous blocks."""
    return torch.arange(n) // (n // C)


def causal_mask(out_groups, in_groups, kh, kw, mask_type):
    """(out, in, kh, kw) mask: taps above the centre row and left of the centre are on; the centre tap
    connects out group g to in groups < g (type A) or <= g (type B); taps after the centre are off."""
    m = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    m[:, :, : kh // 2] = 1
    m[:, :, kh // 2, : kw // 2] = 1
    connect = out_groups[:, None] > in_groups[None] if mask_type == "A" else out_groups[:, None] >= in_groups[None]
    m[:, :, kh // 2, kw // 2] = connect.float()
    return m


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose weight is multiplied by causal_mask (slides: masked convolution for x_>k)."""

    def __init__(self, c_in, c_out, kernel, mask_type, C, out_groups=None):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        out_groups = groups(c_out, C) if out_groups is None else out_groups
        self.register_buffer("mask", causal_mask(out_groups, groups(c_in, C), kh, kw, mask_type))

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def fp32(t):  # at least fp32 (bf16 under autocast -> fp32; a float64 model stays float64)
    return t.double() if t.dtype == torch.float64 else t.float()


def gate_groups(h, C):  # the 4h gate channels (o, f, i, g) each split in C colour groups like the state
    return groups(h, C).repeat(4)


def lstm_cell(gates, c, dim=1):
    """[o, f, i, g] (along dim) -> c' = f . c + i . g, h' = o . tanh(c'); state arithmetic in fp32."""
    o, f, i, g = fp32(gates).chunk(4, dim=dim)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class ResidualBlock(nn.Module):
    """PixelCNN block (paper Fig. 5): ReLU, 1x1 2h -> h, ReLU, 3x3 mask B, ReLU, 1x1 h -> 2h, plus the input."""

    def __init__(self, h, C):
        super().__init__()
        self.f = nn.Sequential(nn.ReLU(), MaskedConv2d(2 * h, h, 1, "B", C), nn.ReLU(), MaskedConv2d(h, h, 3, "B", C),
                               nn.ReLU(), MaskedConv2d(h, 2 * h, 1, "B", C))

    def forward(self, x):
        return x + self.f(x)


class RowLSTM(nn.Module):
    """Row LSTM layer: input-to-state 1 x k mask B over the whole map (height x width; the paper's "k x 1"),
    state-to-state 1D convolution of length k over the previous row's h, rows in sequence; then 1x1 h -> 2h and
    the residual connection."""

    def __init__(self, h, C, k=3):
        super().__init__()
        self.h = h
        self.i2s = MaskedConv2d(2 * h, 4 * h, (1, k), "B", C, out_groups=gate_groups(h, C))
        self.s2s = nn.Conv1d(h, 4 * h, k, padding=k // 2)  # previous row: every pixel of it is in the past
        self.out = MaskedConv2d(h, 2 * h, 1, "B", C)

    def forward(self, x):
        B, _, H, W = x.shape
        x_is = self.i2s(x)  # (B, 4h, H, W)
        h_row = x.new_zeros(B, self.h, W)
        c_row = fp32(x.new_zeros(B, self.h, W))
        rows = []
        for i in range(H):  # one step per row, vectorised over batch and columns
            h_row, c_row = lstm_cell(x_is[:, :, i] + self.s2s(h_row.to(x_is.dtype)), c_row)
            rows.append(h_row)
        return x + self.out(torch.stack(rows, 2).to(x.dtype))  # (B, h, H, W) -> (B, 2h, H, W)


def skew(x):
    """(B, C, H, W) -> (B, C, H, W + H - 1): row i shifted right by i."""
    B, C, H, W = x.shape
    return F.pad(x, (0, H)).flatten(2)[:, :, : H * (W + H - 1)].view(B, C, H, W + H - 1)


def unskew(x, W):
    """Inverse of skew: (B, C, H, W + H - 1) -> (B, C, H, W)."""
    B, C, H, _ = x.shape
    return F.pad(x.flatten(2), (0, H)).view(B, C, H, W + H)[..., :W]


class DiagonalLSTM(nn.Module):
    """One direction: 1x1 mask B input-to-state, skew, a column-wise LSTM whose state-to-state is a 2x1
    convolution over the previous column (upper and left neighbours in image space), unskew."""

    def __init__(self, h, C):
        super().__init__()
        self.h = h
        self.i2s = MaskedConv2d(2 * h, 4 * h, 1, "B", C, out_groups=gate_groups(h, C))
        self.s2s = nn.Linear(2 * h, 4 * h)  # the 2x1 kernel as one matrix on [h of row i - 1, h of row i]

    def forward(self, x):
        B, _, H, W = x.shape
        x_is = skew(self.i2s(x)).permute(3, 0, 2, 1).contiguous()  # (W + H - 1, B, H, 4h): diagonals first
        h_col = x_is.new_zeros(B, H, self.h)
        c_col = fp32(x.new_zeros(B, H, self.h))
        cols = []
        for j in range(len(x_is)):  # one step per diagonal, vectorised over batch and rows
            prev = torch.cat([F.pad(h_col, (0, 0, 1, 0))[:, :H], h_col], -1)  # (B, H, 2h): row i - 1 and row i
            h_col, c_col = lstm_cell(x_is[j] + self.s2s(prev), c_col, dim=-1)
            h_col = h_col.to(x_is.dtype)
            cols.append(h_col)
        return unskew(torch.stack(cols, -1).transpose(1, 2), W)  # (B, H, h, W + H - 1) -> (B, h, H, W)


class DiagonalBiLSTM(nn.Module):
    """Left-to-right + right-to-left (mirrored) directions; the latter shifted down one row (no future leak)."""

    def __init__(self, h, C):
        super().__init__()
        self.fwd, self.bwd = DiagonalLSTM(h, C), DiagonalLSTM(h, C)
        self.out = MaskedConv2d(h, 2 * h, 1, "B", C)

    def forward(self, x):
        right = self.bwd(x.flip(-1)).flip(-1)  # sees row i at columns >= j and the rows above
        right = F.pad(right, (0, 0, 1, 0))[:, :, :-1]  # row i gets row i - 1: only rows above remain
        return x + self.out((self.fwd(x) + right).to(x.dtype))


class PixelNet(nn.Module):
    """x (B, C, H, W) in [0, 1] -> logits (B, C, K, H, W), K = 256 (softmax) or 1 (Bernoulli)."""

    def __init__(self, cfg, shape):
        super().__init__()
        C, self.shape, self.bernoulli = shape[0], tuple(shape), cfg.binarize
        h, self.K = cfg.hidden, 1 if cfg.binarize else 256
        if h % C:
            common.fail(f"--hidden {h} must be divisible by the {C} colour channels (feature groups R, G, B)")
        layer = {"pixelcnn": ResidualBlock, "rowlstm": RowLSTM, "diagbilstm": DiagonalBiLSTM}[cfg.arch]
        self.net = nn.Sequential(
            MaskedConv2d(C, 2 * h, 7, "A", C), *[layer(h, C) for _ in range(cfg.layers)],
            nn.ReLU(), MaskedConv2d(2 * h, 2 * h, 1, "B", C), nn.ReLU(), MaskedConv2d(2 * h, C * self.K, 1, "B", C))

    def forward(self, x):
        B, C, H, W = x.shape
        return self.net(2 * x - 1).view(B, C, self.K, H, W)  # output channels are grouped R | G | B


# ----------------------------------------------------------------------------- objective
# slides: log p(x) = sum_k log p(x_k | x_<k), every conditional from one forward pass, in fp32
def log_prob_from_logits(logits, x, bernoulli):
    """(B,) log p(x) in nats of images x in [0, 1] (8-bit values k/255, or binary) from logits (B, C, K, H, W)."""
    logits = fp32(logits)
    if bernoulli:
        return -F.binary_cross_entropy_with_logits(logits[:, :, 0], x, reduction="none").flatten(1).sum(1)
    k = (x * 255).round().long()  # the exact 8-bit value
    return -F.cross_entropy(logits.transpose(1, 2), k, reduction="none").flatten(1).sum(1)  # (B, 256, C, H, W) vs (B, C, H, W)


def log_prob(model, x):
    return log_prob_from_logits(model(x), x, model.bernoulli)


def nll_loss(logits, x, bernoulli):
    """Loss = mean -log p(x) / D (nats per dimension), and its terms: nats per image, bits/dim for 8-bit data."""
    nll = -log_prob_from_logits(logits, x, bernoulli).mean()
    D = x[0].numel()
    terms = {"loss": nll / D, "nats": nll}
    if not bernoulli:
        terms["bpd"] = common.bits_per_dim(nll, D)
    return nll / D, terms


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, n, device, x=None, start_row=0):
    """Ancestral sampling x_k ~ p(x_k | x_<k), pixel by pixel in raster order, R then G then B within a pixel,
    batched over the n images; one full forward pass per sub-pixel (H*W*C in all, no cached states).
    With x given, rows >= start_row are resampled and the rows above kept (completion)."""
    C, H, W = model.shape
    x = torch.zeros(n, C, H, W, device=device) if x is None else x.clone()
    for i in range(start_row, H):
        for j in range(W):
            for c in range(C):
                logits = model(x)[:, c, :, i, j].float()  # (n, K)
                if model.bernoulli:
                    x[:, c, i, j] = torch.bernoulli(torch.sigmoid(logits[:, 0]))
                else:
                    x[:, c, i, j] = torch.multinomial(F.softmax(logits, -1), 1)[:, 0].float() / 255
    return x


@torch.no_grad()
def complete(model, x):
    """The lower half of x resampled given the upper half; (originals | masked | completions) stacked."""
    H = model.shape[1]
    masked = x.clone()
    masked[:, :, H // 2:] = 0
    return torch.cat([x, masked, sample(model, len(x), x.device, masked, H // 2)])


def save_images(model, cfg, x_test, out, step, autocast):
    model.eval()
    with autocast():
        if cfg.n_samples:
            common.save_grid(sample(model, cfg.n_samples, x_test.device), out / f"samples_{step}.png")
        if cfg.n_complete:
            common.save_grid(complete(model, x_test[: cfg.n_complete]), out / f"complete_{step}.png", nrow=cfg.n_complete)
    model.train()


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, data, cfg, run, step):
    """Exact test NLL: bits/dim of the 8-bit data (softmax), or nats per image of binarized data (Bernoulli)."""
    model.eval()
    log_px = []
    for x in common.test_batches(data, cfg, run.device, 100, f"exact NLL ({cfg.arch})"):
        with run.autocast():
            log_px.append(log_prob(model, x))
    model.train()
    nll = -torch.cat(log_px).mean().item()
    D = math.prod(model.shape)
    if cfg.binarize:
        return common.eval_record(step, nll, "nats", "exact", len(torch.cat(log_px)), arch=cfg.arch)
    return common.eval_record(step, common.bits_per_dim(nll, D), "bpd", "exact", len(torch.cat(log_px)),
                              nats_per_image=nll, arch=cfg.arch)


# ----------------------------------------------------------------------------- train
def check(cfg):
    for name in ("hidden", "layers", "n_samples", "n_complete"):
        low = 1 if name in ("hidden", "layers") else 0
        if getattr(cfg, name) < low:
            common.fail(f"--{name.replace('_', '-')} {getattr(cfg, name)} out of range; accepted: integers >= {low}")


def train(cfg):
    check(cfg)
    data = common.load_data(cfg)
    if data.kind != "image":
        common.fail(f"pixelcnn.py models images; --dataset {cfg.dataset} holds {data.kind} data")
    run = common.setup(cfg, METHOD)
    model = PixelNet(cfg, data.shape).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.fused)
    update = common.Update(opt, model, run, clip=cfg.grad_clip, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    fixed = next(common.test_batches(data, cfg, run.device, max(1, cfg.n_complete)))
    run.print(f"{cfg.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, "
              f"{cfg.layers} layers, h = {cfg.hidden}, {'Bernoulli' if cfg.binarize else '256-way softmax'})")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update,
                               shape=list(data.shape))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            x = next(batches)
            with run.autocast():
                loss, terms = nll_loss(net(x), x, model.bernoulli)  # one forward pass per batch
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            if run.main and common.every(step, cfg.eval_every) and step < cfg.steps:
                log.write(evaluate(model, data, cfg, run, step))
            if run.main and common.every(step, cfg.sample_every) and step < cfg.steps:
                save_images(model, cfg, fixed, run.out, step, run.autocast)
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)  # after Ctrl-C / SIGTERM: exit 130 / 143, the checkpoint written
    if run.main and step >= cfg.steps:
        save_images(model, cfg, fixed, run.out, step, run.autocast)
        log.write(evaluate(model, data, cfg, run, step))
    return model


# ----------------------------------------------------------------------------- main
def main():
    cfg = common.parse_config(Config, PRESETS, METHOD)
    check(cfg)
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    model = PixelNet(cfg, ckpt["shape"]).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        t = time.time()
        with run.autocast():
            x = sample(model, cfg.sample, run.device).cpu()
        dt = time.time() - t
        common.save_grid(x, run.out / "sample.png")
        print(f"{cfg.sample} samples in {dt:.3f}s ({cfg.sample / dt:.2f} images/s, {math.prod(model.shape)} network "
              f"evaluations per batch, {dt / cfg.sample:.3f} s/image) -> {run.out / 'sample.png'}")
    if cfg.eval:
        common.Logger(cfg, run, 0).write(evaluate(model, common.load_data(cfg), cfg, run, ckpt["step"]))


if __name__ == "__main__":
    main()
