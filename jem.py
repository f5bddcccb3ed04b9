"""JEM: a classifier f_theta is secretly an energy-based model of p(x, y) and p(x); trained on log p(x) + log p(y | x).

The logits f_theta(x) of a standard classifier define p(y | x) by the softmax, and, read as negative energies, the joint
p(x, y) = exp(f(x)[y]) / Z and the marginal p(x) = sum_y exp(f(x)[y]) / Z. Shifting every logit by a constant leaves p(y | x)
unchanged but not p(x): the EBM is the classifier's unused degree of freedom. JEM trains log p(x, y) = log p(x) + log p(y | x):
cross-entropy for p(y | x), the contrastive EBM gradient for p(x) with SGLD samples from a persistent replay buffer.

Grathwohl et al., "Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One", arXiv 1912.03263
(code: wgrathwohl/JEM). Slides: "JEM" and "Joint Energy-based Models (JEM)" (logits as energies, p(x, y) and p(x), the shift
freedom, log p(x, y) = log p(x) + log p(y | x), the hybrid table, calibration, out-of-distribution detection, robustness).

    p_theta(y | x) = exp(f(x)[y]) / sum_y' exp(f(x)[y'])
    p_theta(x, y) = exp(f(x)[y]) / Z_theta,   p_theta(x) = sum_y exp(f(x)[y]) / Z_theta,   E_theta(x) = -logsumexp_y f(x)[y]
    log p(x, y) = log p(x) + log p(y | x)
    grad_theta log p(x) = grad_theta logsumexp_y f(x)[y] - E_{x' ~ p_theta(x)}[grad_theta logsumexp_y f(x')[y]]   (slide "EBM")
    loss (--objective jem) = CE(f(x), y) - (mean logsumexp f(x_data) - mean logsumexp f(x_q)),  x_q ~ p_theta(x) by SGLD, held fixed
    loss (--objective pxy), the table's "JEM p(x|y) factored": -(mean f(x_data)[y] - mean f(x_q)[y]),  x_q ~ p_theta(x | y)
    loss (--objective classifier): CE(f(x), y), the same network as a plain classifier
    SGLD (official): x^{k+1} = x^k - lambda grad_x E(x^k) + sigma z,  z ~ N(0, I),  lambda = 1, sigma = 0.01, K = 20 steps
Chains start from the replay buffer (10000 chains, all uniform on [-1, 1]^D at first) with probability 95%, else from uniform
noise, and their results overwrite the buffer entries they were read from (pxy: the buffer is split into one part per class).

As the official code (train_wrn_ebm.py, wideresnet.py, the README's CIFAR-10 command): images x = 2 k / 255 - 1 + sigma_data eps
with sigma_data = 0.03 on training and test inputs (its --sigma); a Wide-ResNet without normalization (conv 3 x 3 to 16 channels,
3 stages of (depth - 4) / 6 pre-activation blocks at widths 16k, 32k, 64k, strides 1, 2, 2, leaky ReLU 0.2, 1 x 1 conv
shortcuts where the shape changes, convs with bias, then leaky ReLU, the mean over positions and a linear map to the logits;
PyTorch's default initialisation: the code's conv_init is never applied); SGLD ascends logsumexp f (no clamping of the chains);
Adam (0.9, 0.999) at lr 1e-4 with a linear warm-up from 0 over 1000 steps, decayed x 0.3 at 80% and 90% of training (the code:
epochs 160 and 180 of 200); batch 64; cifar10: pad-4 reflect random crops and horizontal flips. Differences: one labelled batch
serves both terms (the code draws the p(x) batch and the p(y | x) batch from two loaders; with every label known the gradient
has the same expectation, one forward pass fewer); no 5000-image validation split (the test set is reported); --steps instead of
epochs; pxy classifies by softmax(f(x)), Bayes' rule with equal Z(y), as the code's eval does. Fashion-MNIST: no augmentation
(the code has no preset for it); a WRN-10-1 (0.077M parameters) at batch 32, a 200-step warm-up and 3000 steps for 2 CPU cores
(the paper: WRN-28-10, 36.5M, batch 64); the chains clamped to [-1, 1] (--clamp: without it our first jem and pxy runs diverged
near step 900, the chains at 1e8 and the loss at -4e18 by step 1500). Training stops with one line when |loss| passes 1e8, as
the code's check does. Not implemented: the paper's adversarial-robustness experiments and semi-supervised training.

Metrics (no tractable Z: test_nll is null, as DESIGN.md says for EBMs; the paper reports these): test accuracy and the
cross-entropy of the labels; expected calibration error over ece_bins equal-width confidence bins (the count is ours: 20) and a
reliability diagram reliability_<step>.png; out-of-distribution AUROC with log p(x) + log Z = logsumexp f(x) as the score and, for
comparison, max_y p(y | x), against sets that need no download: uniform noise, constant images, vertically flipped and inverted
test images, and the other of MNIST / Fashion-MNIST where its files are found under --data-dir (never downloaded); FD and the
IS-like score (common.classify's features and classes) of class-conditional samples: eval_K SGLD steps on E(x | y) = -f(x)[y]
from the replay buffer's chains (--eval-init noise: from uniform noise); the energy gap E(test) - E(samples); SGLD cost.

Run:
    python jem.py                                  # fashion-mnist JEM: accuracy, ECE, OOD AUROC, FD / IS-like, samples
    python jem.py --objective classifier --out runs/jem/fashion-classifier       # the plain classifier, same network
    python jem.py --objective pxy --out runs/jem/fashion-pxy                     # the factored p(x | y) model
    python jem.py --sample 100 --eval-K 100       # samples.png (a row per class) and buffer.png from runs/jem/fashion-mnist/ckpt.pt

Results (2 CPU cores, one thread per run, two runs at once; README has the tables and the commands): at 3000 steps x 32
    `python jem.py` (39 min 43 s): test accuracy 0.663, ECE 0.093; samples (20 SGLD steps from the buffer) FD 102.8, IS-like 3.09;
    OOD AUROC by log p(x): noise 1.000, constant 0.929, inverted 1.000, flipped 0.598, MNIST 0.395 (max p(y|x): 0.771, 0.319,
    0.405, 0.593, 0.794); `--seed 1` (34 min): accuracy 0.658, ECE 0.096, FD 121.5 (a retrained FD classifier), IS-like
    2.82, OOD AUROC by log p(x) 1.000, 0.947, 1.000, 0.595, MNIST 0.529. `--objective pxy`: accuracy 0.200, FD 76.6, IS-like 3.88 (seed 1: 0.266, 76.6, 3.93). `--objective classifier` (4 min 20 s,
    seeds 0 / 1): accuracy 0.733 / 0.727, ECE 0.057 / 0.065, FD 717 / 721, OOD AUROC by logsumexp f: 0.43 / 0.80 (noise),
    0.20 / 0.19 (constant). The cifar10 preset: not yet measured.
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "jem"


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.TrainConfig):
    objective: str = common.choice("jem", "classifier", "pxy")  # jem: log p(y|x) + log p(x); classifier: log p(y|x); pxy: log p(x|y)
    depth: int = 28  # Wide-ResNet depth, 6n + 4 (n blocks per stage)
    widen: int = 10  # Wide-ResNet widening factor k (stage widths 16k, 32k, 64k)
    dropout: float = 0.0  # dropout inside the blocks (official default 0)
    sigma: float = 0.03  # std of the Gaussian noise added to every data input, training and test (official --sigma)
    K: int = 20  # SGLD steps per training iteration
    step_size: float = 1.0  # SGLD step lambda on -grad_x E (official sgld_lr)
    noise: float = 0.01  # SGLD noise std per step (official sgld_std)
    clamp: bool = False  # clamp the chains to [-1, 1] after every SGLD step (the official code does not; see the docstring)
    buffer_size: int = 10000  # replay buffer chains
    reinit: float = 0.05  # fraction of chains restarted from uniform noise
    warmup: int = 1000  # steps of linear learning-rate warm-up from 0 (0 = none)
    decay_rate: float = 0.3  # lr factor at 80% and at 90% of --steps
    augment: bool = False  # random crops (pad 4, reflect) and horizontal flips of training images
    eval_K: int = 0  # SGLD steps of the class-conditional samples in evaluate / --sample (0 = K)
    eval_init: str = common.choice("buffer", "noise")  # where those chains start: the replay buffer's chains or uniform noise
    eval_samples: int = 500  # evaluate: class-conditional samples (equal per class) scored by FD / IS-like
    eval_batch: int = 250  # images per batch in evaluate and sampling
    ood_n: int = 1000  # evaluate: images per set in the OOD AUROCs (in-distribution: the first ood_n test images)
    ece_bins: int = 20  # equal-width confidence bins of the ECE and the reliability diagram
    grid: int = 100  # samples in each samples_<step>.png (a row per class)

PRESETS = {
    "fashion-mnist": dict(depth=10, widen=1, batch_size=32, lr=1e-4, steps=3000, warmup=200, clamp=True, log_every=100, ckpt_every=500,
                          eval_samples=500, ood_n=1000, eval_K=20),
    "cifar10": dict(depth=28, widen=10, batch_size=64, lr=1e-4, steps=140_000, warmup=1000, augment=True, log_every=100,
                    ckpt_every=5000, eval_samples=10000, ood_n=10000),
}
PRESETS["mnist"] = PRESETS["fashion-mnist"]

def resolve(cfg, kind=None, n_classes=None):
    if cfg.depth < 10 or (cfg.depth - 4) % 6:
        common.fail(f"--depth {cfg.depth}: a Wide-ResNet has depth 6n + 4 with n >= 1; accepted: 10, 16, 22, 28, ...")
    for flag, v, lo in (("--widen", cfg.widen, 1), ("--K", cfg.K, 1), ("--buffer-size", cfg.buffer_size, 1), ("--warmup", cfg.warmup, 0),
                        ("--eval-K", cfg.eval_K, 0), ("--eval-samples", cfg.eval_samples, 0), ("--eval-batch", cfg.eval_batch, 1),
                        ("--ood-n", cfg.ood_n, 0), ("--ece-bins", cfg.ece_bins, 1), ("--grid", cfg.grid, 1)):
        if v < lo:
            common.fail(f"{flag} {v} out of range; accepted: integers >= {lo}")
    for flag, v in (("--sigma", cfg.sigma), ("--step-size", cfg.step_size), ("--noise", cfg.noise)):
        if not v >= 0:
            common.fail(f"{flag} {v} out of range; accepted: >= 0")
    if not 0 <= cfg.reinit <= 1 or not 0 < cfg.decay_rate <= 1 or not 0 <= cfg.dropout < 1:
        common.fail(f"--reinit {cfg.reinit} / --decay-rate {cfg.decay_rate} / --dropout {cfg.dropout}: accepted 0 <= reinit <= 1, "
                    "0 < decay-rate <= 1, 0 <= dropout < 1")
    if kind and kind != "image":
        common.fail(f"jem.py models labelled images; --dataset {cfg.dataset} holds {kind} data")
    if n_classes is not None and n_classes < 2:
        common.fail(f"--dataset {cfg.dataset} has no class labels; jem.py needs them (accepted: fashion-mnist, mnist, cifar10)")
    if n_classes and cfg.objective == "pxy" and cfg.buffer_size % n_classes:
        common.fail(f"--buffer-size {cfg.buffer_size}: pxy splits the buffer into {n_classes} classes; accepted: a multiple of {n_classes}")
    return cfg


# ----------------------------------------------------------------------------- networks
class WideBasic(nn.Module):
    """The official wide_basic block without normalization: h = conv1(lrelu(x)), dropout, h = conv2(lrelu(h)) (stride s), out = h + shortcut(x)."""
    def __init__(self, c_in, c_out, stride, dropout):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()
    def forward(self, x):
        h = self.drop(self.conv1(F.leaky_relu(x, 0.2)))
        return self.conv2(F.leaky_relu(h, 0.2)) + self.shortcut(x)

class WideResNet(nn.Module):
    """f_theta: images (B, C, H, W) in about [-1, 1] -> logits (B, n_classes). WRN-depth-k (Zagoruyko & Komodakis) as the official
    wideresnet.py with norm=None: conv to 16, stages of n = (depth - 4) / 6 blocks at 16k, 32k, 64k (strides 1, 2, 2), leaky ReLU,
    the mean over positions, a linear map."""
    def __init__(self, cfg, shape, n_classes):
        super().__init__()
        n, k = (cfg.depth - 4) // 6, cfg.widen
        self.conv_in = nn.Conv2d(shape[0], 16, 3, padding=1)
        blocks, c = [], 16
        for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for i in range(n):
                blocks.append(WideBasic(c, width, stride if i == 0 else 1, cfg.dropout))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(c, n_classes)
    def forward(self, x):
        h = self.blocks(self.conv_in(x))  # (B, 64k, H/4, W/4)
        return self.out(F.leaky_relu(h, 0.2).mean((2, 3)))  # (B, n_classes)


# ----------------------------------------------------------------------------- objective
def fp32(logits):  # likelihood arithmetic in float32 at least (bf16 logits under autocast), float64 kept
    return logits.to(torch.promote_types(logits.dtype, torch.float32))

# slide "JEM": p(y | x) = exp(f(x)[y]) / sum_y' exp(f(x)[y'])
def log_p_y_given_x(logits):
    return fp32(logits).log_softmax(1)

# slide "JEM": p(x, y) = exp(f(x)[y]) / Z, so log p(x, y) + log Z = f(x)[y]  (-f(x)[y] = E(x, y))
def log_p_xy_unnormalized(logits, y):
    return fp32(logits).gather(1, y[:, None]).squeeze(1)

# slide "JEM": p(x) = sum_y exp(f(x)[y]) / Z, so log p(x) + log Z = logsumexp_y f(x)[y]  (E(x) = -logsumexp)
def log_p_x_unnormalized(logits):
    return fp32(logits).logsumexp(1)

def jem_loss(objective, logits, y, logits_q=None):
    """The objective's loss and terms. logits: f(x) of the data batch (B, n_classes), y its labels; logits_q: f(x_q) of the SGLD samples.
    jem: -log p(y | x) - log p(x) (slide "JEM": log p(x, y) = log p(x) + log p(y | x)); the second term's gradient by the contrastive
    form (slide "EBM": grad log Z = E_{x_q ~ p}[grad logsumexp f(x_q)]), x_q held fixed. pxy: -log p(x | y), the same with
    f(x)[y] and x_q ~ p(x | y). classifier: -log p(y | x) only. gap = E(data) - E(samples), the EBM's health signal."""
    ce = F.cross_entropy(logits.float(), y)
    terms = {"ce": ce, "acc": (logits.argmax(1) == y).float().mean()}
    if objective == "classifier":
        loss = ce
    else:
        score = log_p_x_unnormalized if objective == "jem" else lambda l: log_p_xy_unnormalized(l, y)
        gap = -(score(logits).mean() - score(logits_q).mean())  # -log p(x) (or -log p(x | y)) up to log Z's sample estimate
        loss = ce + gap if objective == "jem" else gap
        terms.update(gap=gap, f_data=score(logits).mean(), f_q=score(logits_q).mean())
    return loss, {"loss": loss, **terms}


# ----------------------------------------------------------------------------- sampling
def energy_fn(model, y, run):
    """E(x) = -logsumexp_y f(x)[y] (y None), or E(x | y) = -f(x)[y]: (B,) in float32 under the run's autocast."""
    def energy(x):
        with run.autocast():
            logits = model(x)
        return -(log_p_x_unnormalized(logits) if y is None else log_p_xy_unnormalized(logits, y))
    return energy

def sgld(energy, x, K, step_size, noise, clamp=False):
    """SGLD as the official sample_q: K steps x^{k+1} = x^k - step_size grad_x E(x^k) + noise z, z ~ N(0, I) (the slide's form has
    step alpha/2 and noise sqrt(alpha); the code decouples them: a temperature noise^2 / (2 step_size) = 5e-5); with clamp, each
    x^{k+1} is clamped to the data's box [-1, 1] (the official code leaves the chains free)."""
    x = x.detach()
    for _ in range(K):
        with torch.enable_grad():
            x.requires_grad_(True)
            g = torch.autograd.grad(energy(x).sum(), x)[0]
        x = x.detach() - step_size * g + noise * torch.randn_like(x)
        x = x.clamp(-1, 1) if clamp else x
    return x

def uniform_noise(n, shape, device):  # the chains' start: U[-1, 1]^D
    return torch.rand(n, *shape, device=device) * 2 - 1

class ReplayBuffer:
    """The official buffer: `size` chains, all uniform noise on [-1, 1]^D at first (float, unclamped). chains() reads random entries
    (with labels y: from y's own block of size / n_classes entries), restarting each from noise with probability reinit;
    update() writes the SGLD results back where they were read."""
    def __init__(self, size, shape, device, n_classes=1):
        self.x, self.per = uniform_noise(size, shape, device), size // n_classes
    def chains(self, n, y=None, reinit=0.0):
        idx = torch.randint(self.per, (n,), device=self.x.device) + (y * self.per if y is not None else 0)
        restart = (torch.rand(n, device=self.x.device) < reinit).view(-1, *[1] * (self.x.dim() - 1))
        return torch.where(restart, uniform_noise(n, self.x.shape[1:], self.x.device), self.x[idx]), idx
    def update(self, idx, x):
        self.x[idx] = torch.where(torch.isfinite(x), x, uniform_noise(len(x), x.shape[1:], x.device))  # a diverged chain restarts
    def state_dict(self):
        return {"x": self.x}
    def load_state_dict(self, s):
        if s["x"].shape != self.x.shape:
            common.fail(f"the checkpoint's replay buffer has shape {tuple(s['x'].shape)}, this run's {tuple(self.x.shape)}; "
                        "use the checkpoint's --buffer-size")
        self.x.copy_(s["x"])

@torch.no_grad()
def sample_conditional(model, y, shape, cfg, run, buffer=None, K=None):
    """Class-conditional samples x ~ p(x | y): K (default eval_K or K) SGLD steps on E(x | y) = -f(x)[y], each chain started from a
    replay-buffer chain (pxy: from y's block) or, with --eval-init noise or no buffer, from uniform noise. Returns x (CPU) and the cost."""
    K, model = K or cfg.eval_K or cfg.K, model.eval()
    xs, t0 = [], time.time()
    for yb in y.split(cfg.eval_batch):
        yb = yb.to(run.device)
        if cfg.eval_init == "buffer" and buffer is not None:
            x0 = buffer.chains(len(yb), yb if buffer.per < len(buffer.x) else None)[0]
        else:
            x0 = uniform_noise(len(yb), shape, run.device)
        xs.append(sgld(energy_fn(model, yb, run), x0, K, cfg.step_size, cfg.noise, cfg.clamp).cpu())
    dt = time.time() - t0
    return torch.cat(xs), {"sgld_steps": K, "s_per_sample": dt / max(len(y), 1), "samples_per_s": len(y) / max(dt, 1e-9),
                           "sample_init": cfg.eval_init if buffer is not None else "noise"}

def to_image(x):  # model space [-1, 1] -> images in [0, 1]
    return ((x + 1) / 2).clamp(0, 1)

def save_pictures(model, shape, cfg, run, name, n, n_classes, buffer):
    """<name>.png: n class-conditional samples, a row per class; buffer<suffix>.png: n replay-buffer chains. Returns samples, cost."""
    per = max(1, n // n_classes)
    y = torch.arange(n_classes).repeat_interleave(per)
    x, cost = sample_conditional(model, y, shape, cfg, run, buffer)
    common.save_grid(to_image(x), run.out / f"{name}.png", nrow=per)
    chains = buffer.x[torch.randint(len(buffer.x), (n,), device=buffer.x.device)].cpu()
    common.save_grid(to_image(chains), run.out / f"buffer{name[len('samples'):]}.png")
    return x, cost


# ----------------------------------------------------------------------------- evaluate
def expected_calibration_error(confidence, correct, bins):
    """ECE = sum_b |B_b| / N |accuracy(B_b) - confidence(B_b)|, B_b the predictions whose confidence max_y p(y | x) lies in
    ((b - 1) / bins, b / bins] (Guo et al. 2017; equal-width bins), in float64. Returns ECE and per bin (count, accuracy, confidence)."""
    confidence, correct = confidence.double(), correct.double()
    b = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(b, minlength=bins).double()
    acc = torch.bincount(b, correct, minlength=bins) / count.clamp_min(1)
    conf = torch.bincount(b, confidence, minlength=bins) / count.clamp_min(1)
    return ((count / len(b)) * (acc - conf).abs()).sum().item(), (count, acc, conf)

def reliability_diagram(count, acc, conf, px=10):
    """A (3, H, W) picture: per confidence bin a bar to its accuracy (blue), the gap to its mean confidence red where confidence exceeds
    accuracy (over-confident: drawn above the bar) and green where it falls short (under-confident: the bar's top), the diagonal (black)."""
    bins, side = len(count), len(count) * px
    img = torch.ones(3, side, side)
    level = lambda v: side - int(round(v * side))  # the row of height v (0 at the bottom)
    for b in range(bins):
        if count[b] == 0:
            continue
        cols = slice(b * px + 1, (b + 1) * px - 1)
        top_acc, top_conf = level(acc[b].item()), level(conf[b].item())
        img[:, top_acc:, cols] = torch.tensor([0.2, 0.4, 0.9])[:, None, None]
        over = top_conf < top_acc  # (rows grow downwards)
        img[:, min(top_acc, top_conf):max(top_acc, top_conf), cols] = torch.tensor([0.9, 0.3, 0.3] if over else [0.2, 0.7, 0.3])[:, None, None]
    i = torch.arange(side)
    img[:, side - 1 - i, i] = 0.0  # the diagonal: accuracy = confidence
    return img

def auroc(score_in, score_out):
    """Area under the ROC curve of telling in-distribution (positive) from OOD examples by a higher score: P(s_in > s_out) +
    P(s_in = s_out) / 2, the Mann-Whitney U statistic from average ranks (ties share their mean rank), in float64."""
    s = torch.cat([score_in, score_out]).double()
    values, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    counts = counts.double()
    start = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first occurrence
    rank = (start + (counts + 1) / 2)[inverse]  # average 1-based ranks
    n_in, n_out = len(score_in), len(score_out)
    return ((rank[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)).item()

def offline_test_images(name, data_dir):
    """The test images of mnist / fashion-mnist (uint8, (N, 1, 28, 28)) where their idx file is on disk in torchvision's layout
    <data_dir>/<MNIST|FashionMNIST>/raw (or Debian's Fashion-MNIST package), else None: never a download. (Not <data_dir> itself:
    files there could be either set.)"""
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for d in [os.path.join(data_dir, sub, "raw")] + ([common.DEBIAN_FASHION] if sub == "FashionMNIST" else []):
        for p in (f"{d}/t10k-images-idx3-ubyte", f"{d}/t10k-images-idx3-ubyte.gz"):
            if os.path.isfile(p):
                return common._read_idx(p)[:, None]
    return None

def ood_sets(data, cfg, n, gen):
    """Out-of-distribution images in [0, 1] (n, C, H, W): uniform 8-bit noise, constant images (a uniform level each), the test images
    flipped vertically and inverted (1 - x), and the other of MNIST / Fashion-MNIST when its files are on disk."""
    test = data.test[:n].float() / 255
    sets = {"noise": torch.randint(0, 256, test.shape, generator=gen).float() / 255,
            "constant": torch.randint(0, 256, (len(test), 1, 1, 1), generator=gen).float().expand_as(test) / 255,
            "vflip": test.flip(-2), "inverted": 1 - test}
    other = {"fashion-mnist": "mnist", "mnist": "fashion-mnist"}.get(data.name)
    if other and tuple(data.shape) == (1, 28, 28) and (x := offline_test_images(other, cfg.data_dir)) is not None:
        sets[other] = x[:n].float() / 255
    return sets

def encode(x, cfg, gen=None):
    """Images k / 255 in [0, 1] -> the network's input 2 k / 255 - 1 + sigma eps (official: Normalize(0.5, 0.5), then + sigma N(0, 1))."""
    eps = torch.randn(x.shape, generator=gen).to(x.device) if gen is not None else torch.randn_like(x)
    return 2 * x - 1 + cfg.sigma * eps

@torch.no_grad()
def logits_of(model, x, cfg, run):  # f(x) of network inputs x (CPU), in batches of eval_batch: float32 on the CPU
    out = []
    for xb in x.split(cfg.eval_batch):
        with run.autocast():
            out.append(model(xb.to(run.device)).float().cpu())
    return torch.cat(out)

def image_logits(model, x, cfg, run, gen):  # f(encode(x)) of images x in [0, 1], the data noise drawn from gen
    return logits_of(model, encode(x, cfg, gen), cfg, run)

@torch.no_grad()
def evaluate(model, data, cfg, run, step, buffer, n_classes, tag=""):
    """Test accuracy, label cross-entropy, ECE and reliability<tag>.png; OOD AUROCs (scores log p(x) + log Z and max p(y | x));
    FD, IS-like and class accuracy (common.classify) of class-conditional SGLD samples, the energy gap, the sampling cost."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    test, labels = data.test[:cfg.eval_n or None].float() / 255, data.test_labels[:cfg.eval_n or None]
    logits = image_logits(model, test, cfg, run, gen)  # (N, n_classes)
    log_p = log_p_y_given_x(logits)
    confidence, prediction = log_p.exp().max(1)
    correct = prediction == labels
    ece, (count, acc, conf) = expected_calibration_error(confidence, correct, cfg.ece_bins)
    common.save_grid(reliability_diagram(count, acc, conf)[None], run.out / f"reliability{tag}.png")
    extras = dict(accuracy=correct.double().mean().item(), class_nll=F.nll_loss(log_p, labels).item(), ece=ece, ece_bins=cfg.ece_bins,
                  mean_confidence=confidence.double().mean().item(), objective=cfg.objective)
    if cfg.ood_n:
        n = min(cfg.ood_n, len(data.test))
        scores = lambda l: {"log_px": log_p_x_unnormalized(l), "max_py": log_p_y_given_x(l).exp().max(1)[0]}
        s_in = scores(image_logits(model, data.test[:n].float() / 255, cfg, run, gen))
        for name, x in ood_sets(data, cfg, n, gen).items():
            s_out = scores(image_logits(model, x, cfg, run, gen))
            extras.update({f"ood_{name}_{k}": auroc(s_in[k], s_out[k]) for k in s_in})
        extras["ood_n"] = n
    if cfg.eval_samples:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            y = torch.arange(n_classes).repeat_interleave(max(1, cfg.eval_samples // n_classes))
            x, cost = sample_conditional(model, y, data.shape, cfg, run, buffer)
        images = to_image(x)
        _, c_logits = common.classify(images, data, cfg, run)
        e_samples = -log_p_x_unnormalized(logits_of(model, x, cfg, run))  # E(x) of the samples as they are (no data noise)
        extras.update(fd=common.frechet_distance(images, data, cfg, run), fd_kind=common.fd_label(cfg), is_like=inception_like_score(c_logits),
                      sample_class_accuracy=(c_logits.argmax(1) == y).double().mean().item(), samples=len(y),
                      energy_gap=(-log_p_x_unnormalized(logits)).mean().item() - e_samples.mean().item(), **cost)
        extras["sampler"] = (f"SGLD on -f(x)[y]: step {cfg.step_size:g}, noise {cfg.noise:g}, {cost['sgld_steps']} steps from {cost['sample_init']}"
                             + (", clamped to [-1, 1]" if cfg.clamp else ""))
    return common.eval_record(step, None, "bpd", None, len(test), **extras)

def inception_like_score(logits):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean p(y|x) of the samples (Salimans et al. 2016, one split), in common.classify's classes."""
    log_p = logits.double().log_softmax(1)
    return math.exp((log_p.exp() * (log_p - log_p.exp().mean(0).log())).sum(1).mean().item())


# ----------------------------------------------------------------------------- train
def learning_rate(cfg, step):
    """The official schedule: lr * step / warmup during the warm-up (0 at step 0), then x decay_rate at 80% and again at 90% of --steps."""
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    return cfg.lr * warm * cfg.decay_rate ** sum(step >= f * cfg.steps for f in (0.8, 0.9))

def random_crop(x, pad=4):
    """Each image shifted by a random crop of its reflect-padded copy (torchvision's Pad(4, reflect) + RandomCrop), vectorised."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (b, 1), device=x.device) for _ in range(2))
    rows, cols = dy + torch.arange(h, device=x.device), dx + torch.arange(w, device=x.device)  # (B, H), (B, W)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)

def load_data(cfg):
    data = common.load_data(cfg)
    n_classes = int(data.train_labels.max()) + 1 if data.kind == "image" and data.train_labels is not None else 0
    resolve(cfg, data.kind, n_classes)
    return data, n_classes

def make_model(cfg, shape, n_classes):
    return WideResNet(cfg, shape, n_classes)

def train(cfg):
    data, n_classes = load_data(cfg)
    run = common.setup(cfg, METHOD)
    model = make_model(cfg, data.shape, n_classes).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=run.fused)
    update = common.Update(opt, model, run, diverge=cfg.diverge)
    batches = common.Batches(data, cfg, run, hflip=cfg.augment, labels=True)
    buffer = ReplayBuffer(cfg.buffer_size, data.shape, run.device, n_classes if cfg.objective == "pxy" else 1)
    step = common.resume(cfg, run, METHOD, model, optimizer=opt, batches=batches, update=update, buffer=buffer)
    net, log = common.wrap(model, run, cfg), common.Logger(cfg, run, step, update)
    sampler = torch.compile(model) if cfg.compile else model
    blown = torch.zeros((), dtype=torch.bool, device=run.device)  # |loss| > 1e8 at some step (the official code's divergence stop)
    run.print(f"WideResNet-{cfg.depth}-{cfg.widen} {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters | objective "
              f"{cfg.objective} | " + ("no sampling" if cfg.objective == "classifier" else
              f"SGLD x - {cfg.step_size:g} grad E + {cfg.noise:g} z, K {cfg.K}, buffer {cfg.buffer_size}"
              + (f" ({n_classes} class blocks)" if cfg.objective == "pxy" else "") + f", reinit {cfg.reinit:g}"
              + (", chains clamped to [-1, 1]" if cfg.clamp else "")) + f" | data noise {cfg.sigma:g}")

    def checkpoint():
        common.save_checkpoint(cfg, run, METHOD, step, model=model, optimizer=opt, batches=batches, update=update, buffer=buffer,
                               shape=list(data.shape), n_classes=n_classes)

    def pictures_and_eval(pictures, evaluation):
        if pictures:
            save_pictures(model, data.shape, cfg, run, f"samples_{step}", cfg.grid, n_classes, buffer)
        if evaluation:
            log.write(evaluate(model, data, cfg, run, step, buffer, n_classes, f"_{step}"))

    with common.Stop(run, cfg) as stop:
        while step < cfg.steps and not stop(step):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            x, y = next(batches)
            x, x_q = encode(random_crop(x) if cfg.augment else x, cfg), None
            if cfg.objective != "classifier":  # x_q ~ p(x) (jem) or p(x | y) (pxy): SGLD from the replay buffer
                y_q = y if cfg.objective == "pxy" else None
                x0, idx = buffer.chains(len(x), y_q, cfg.reinit)
                model.eval()
                x_q = sgld(energy_fn(sampler, y_q, run), x0, cfg.K, cfg.step_size, cfg.noise, cfg.clamp)
                buffer.update(idx, x_q)
            model.train()  # (after the sampler, and after an evaluation)
            with run.autocast():
                logits = net(x if x_q is None else torch.cat([x, x_q])).float()  # (B or 2B, n_classes): data, then samples
            logits, logits_q = (logits, None) if x_q is None else logits.chunk(2)
            loss, terms = jem_loss(cfg.objective, logits, y, logits_q)
            opt.zero_grad(set_to_none=True)
            update(loss)
            step += 1
            log(step, terms)
            blown |= loss.detach().abs() > 1e8
            if common.every(step, cfg.log_every) and blown.item():  # (one host read per log line)
                common.fail(f"step {step}: |loss| passed 1e8, the EBM diverged (the official code's stop); {cfg.ckpt} keeps the last "
                            "checkpoint; try --clamp, a smaller --lr or --step-size, or a larger --sigma")
            if run.main and step < cfg.steps:
                pictures_and_eval(common.every(step, cfg.sample_every), common.every(step, cfg.eval_every))
            if common.every(step, cfg.ckpt_every):
                checkpoint()
    if run.world > 1:
        common.ddp_check(model, run)
    checkpoint()
    stop.exit_if_stopped(step)
    if run.main and step >= cfg.steps:
        pictures_and_eval(True, True)
    return model, buffer


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(common.parse_config(Config, PRESETS, METHOD, argv=argv))
    if not (cfg.eval or cfg.sample):
        return train(cfg)
    run = common.setup(cfg, METHOD, train=False)
    ckpt = common.load_checkpoint(cfg.ckpt, (METHOD,))
    shape, n_classes = tuple(ckpt["shape"]), int(ckpt["n_classes"])
    resolve(cfg, "image", n_classes)
    model = make_model(cfg, shape, n_classes).to(run.device).eval()
    common.load_model_state(model, ckpt["model"], cfg.ckpt)
    buffer = ReplayBuffer(len(ckpt["buffer"]["x"]), shape, run.device, n_classes if cfg.objective == "pxy" else 1)
    buffer.load_state_dict(ckpt["buffer"])
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.sample:
        _, cost = save_pictures(model, shape, cfg, run, "samples", cfg.sample, n_classes, buffer)
        n = max(1, cfg.sample // n_classes) * n_classes
        print(f"{n} class-conditional samples in {n * cost['s_per_sample']:.3f}s ({cost['samples_per_s']:.2f} samples/s, SGLD K "
              f"{cost['sgld_steps']} from {cost['sample_init']}, one energy gradient per step) -> {run.out / 'samples.png'}, {run.out / 'buffer.png'}")
    if cfg.eval:
        data, _ = load_data(cfg)
        common.Logger(cfg, run, 0).write(evaluate(model, data, cfg, run, ckpt["step"], buffer, n_classes))

if __name__ == "__main__":
    main()
