"""Infrastructure shared by every method file - how to run, never what a method is: config and CLI,
data, device / precision / DDP, logging, checkpoints, EMA, a guarded optimizer update, grids, bits/dim."""
import argparse, atexit, copy, dataclasses, gzip, inspect, json, math, os, pickle, random, re, shutil, signal, struct, sys, time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torchvision

IMAGE_SETS = ("fashion-mnist", "mnist", "cifar10")
TOY_SETS = ("moons", "circles", "8gaussians", "checkerboard", "pinwheel", "swissroll", "2spirals")
VIDEO_SETS = ("moving-fashion", "moving-mnist")
DATASETS = IMAGE_SETS + TOY_SETS + VIDEO_SETS + ("folder:PATH",)
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # files of Debian's package dataset-fashion-mnist

def fail(msg):  # stop with one clear line
    raise SystemExit(f"error: {msg}")

@contextmanager
def writing(path):  # a failed write (a file where a folder should be, no permission, a full disk): one line, not a traceback
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a full disk as a RuntimeError
        fail(f"could not write {path}: {e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[-1].strip()}")

# ----------------------------------------------------------------------------- config / CLI
def choice(*options):  # a str field restricted to `options`; the first is the default
    return field(default=options[0], metadata={"choices": options})

@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | cifar10 | folder:PATH | a 2D toy (moons, ...) | moving-mnist | moving-fashion
    data_dir: str = "./data"  # where datasets are looked for (and downloaded to)
    out: str = ""  # run folder (default runs/<method>/<dataset>)
    steps: int = 10000  # optimizer steps
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 1e-3  # learning rate
    seed: int = 0  # random seed (rank r uses seed + r)
    device: str = choice("auto", "cpu", "cuda", "mps")  # auto = cuda > mps > cpu
    precision: str = choice("auto", "fp32", "bf16", "fp16")  # autocast dtype; auto = bf16 on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the training module
    log_every: int = 100  # steps between log lines
    eval_every: int = 0  # steps between test evaluations (0 = at the end only)
    sample_every: int = 0  # steps between sample grids (0 = at the end only)
    ckpt_every: int = 1000  # steps between checkpoints (also written at the end and on Ctrl-C/SIGTERM)
    eval_n: int = 0  # test examples used by evaluate (0 = the whole test set)
    fid_inception: bool = False  # FD in torchvision Inception-v3 features (needs its downloaded weights; not the TF-Inception FID of papers)
    cache_dir: str = "runs/cache"  # FD: where its feature classifier is kept (trained once per data set, a few minutes on a CPU)
    diverge: float = 10.0  # stop when the loss stays above L_1 + diverge * (|L_1| + 1) for 100 steps (L_1: the first loss; 0 = never)
    resume: bool = False  # continue from --ckpt (default <out>/ckpt.pt)
    eval: bool = False  # only evaluate --ckpt, print and write the metrics
    sample: int = 0  # only draw this many samples from --ckpt into a PNG grid
    ckpt: str = ""  # checkpoint path (default <out>/ckpt.pt)
    binarize: bool = False  # dynamic binarization x ~ Bernoulli(pixel intensity), for Bernoulli likelihoods
    image_size: int = 64  # folder:PATH: side images are resized and center-cropped to
    frames: int = 20  # moving-*: frames per video
    frame_size: int = 64  # moving-*: side of a frame

def _field_help(cls):
    """The trailing `# comment` of every dataclass field, read from the source of cls and its bases."""
    helps = {}
    for c in reversed(cls.__mro__[:-1]):
        with suppress(OSError, TypeError):  # no source: a built-in class or one made by exec
            helps.update(re.findall(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", inspect.getsource(c), re.M))
    return helps

def _apply(cfg, values, origin):
    for k, v in values.items():
        if not hasattr(cfg, k):
            raise KeyError(f"{origin}: unknown field {k!r}")
        setattr(cfg, k, v)

def _preset_key(name, presets):  # a toy density without a preset of its own takes PRESETS["toy"]
    return "folder" if name.startswith("folder:") else "toy" if name in TOY_SETS and name not in presets else name

def parse_config(cls, presets, method, argv=None, accept=(), own_sets=()):
    """Defaults, then PRESETS[dataset], then explicit flags; with --eval/--sample the checkpoint's config, then flags.
    accept: other methods whose checkpoints load here; own_sets: data sets the method file makes itself."""
    helps, types = _field_help(cls), {"int": int, "float": float, "str": str, "bool": bool}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default=cls.dataset)
    shown = _preset_key(shown_name := pre.parse_known_args(argv)[0].dataset, presets)  # --help shows what runs for it
    p = argparse.ArgumentParser(prog=f"{method}.py", description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
                                epilog=f"[values] are what runs with --dataset {shown_name}: the defaults, then PRESETS[{shown!r}] in the "
                                       "file; add --dataset NAME to --help for another data set's.")
    for f in dataclasses.fields(cls):
        typ, v = types.get(f.type, f.type), presets.get(shown, {}).get(f.name, f.default)
        help = f"{helps.get(f.name, '')} [{v}" + (f", from the {shown} preset; default {f.default}]" if v != f.default else "]")
        kw = dict(action=argparse.BooleanOptionalAction) if typ is bool else dict(type=typ, metavar="|".join(f.metadata.get("choices", ())) or typ.__name__.upper())
        p.add_argument("--" + f.name.replace("_", "-"), default=None, help=help.replace("%", "%%"), **kw)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg, name = cls(), given.get("dataset", cls.dataset)
    if name not in DATASETS + tuple(own_sets) and not name.startswith("folder:"):
        fail(f"--dataset {name!r} unknown; accepted: {', '.join(DATASETS + tuple(own_sets))}")
    key = _preset_key(name, presets)
    _apply(cfg, presets.get(key, {}), f"PRESETS[{key!r}]")
    _apply(cfg, given, "flags")
    cfg.out = cfg.out or os.path.join("runs", method, "folder-" + Path(name[7:]).name if name.startswith("folder:") else name)
    cfg.ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if cfg.resume and "ckpt" in given and not os.path.isfile(cfg.ckpt):  # only the default <out>/ckpt.pt may be absent
        fail(f"--resume --ckpt {cfg.ckpt}: no such checkpoint (without --ckpt, --resume starts at step 0 when <out>/ckpt.pt is absent)")
    _check(cfg)
    if cfg.eval or cfg.sample:  # rebuild the trained run's config from its checkpoint
        saved = load_checkpoint(cfg.ckpt, (method,) + tuple(accept))["config"]
        cfg = cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        _apply(cfg, given, "flags")
        _check(cfg)
    return cfg

def _check(cfg):  # one line for the first value out of range
    minimum = dict(steps=1, batch_size=1, log_every=1, eval_every=0, sample_every=0, ckpt_every=0, eval_n=0, sample=0, image_size=1,
                   frames=1, frame_size=1)
    for f in dataclasses.fields(cfg):
        v, flag, opts = getattr(cfg, f.name), "--" + f.name.replace("_", "-"), f.metadata.get("choices")
        if opts and v not in opts:
            fail(f"{flag} {v!r} unknown; accepted: {', '.join(opts)}")
        if f.name in minimum and v < minimum[f.name]:
            fail(f"{flag} {v} out of range; accepted: integers >= {minimum[f.name]}")
        if isinstance(v, float) and not math.isfinite(v):  # --lr inf would write NaN weights at the first step
            fail(f"{flag} {v} is not a finite number")
    if not cfg.lr > 0:
        fail(f"--lr {cfg.lr} out of range; accepted: > 0")
    if not cfg.diverge >= 0:
        fail(f"--diverge {cfg.diverge} out of range; accepted: >= 0 (0 = never stop for a rising loss)")
    if cfg.dataset.startswith("folder:") and not os.path.isdir(cfg.dataset[7:]):
        fail(f"--dataset {cfg.dataset}: no such folder")

# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    name: str
    kind: str  # "image": uint8 (N, C, H, W) | "toy": float (N, 2) | "video": uint8 (N, T, 1, S, S)
    shape: tuple  # of one example
    train: torch.Tensor  # (for video: the digits the videos are made of)
    test: torch.Tensor
    train_labels: torch.Tensor = None
    test_labels: torch.Tensor = None

def _read_idx(path):
    """An idx file (MNIST format): 0, 0, type 8 (uint8), ndim, big-endian sizes, then the data."""
    buf = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    if buf[:3] != b"\0\0\x08":
        fail(f"{path}: not a uint8 idx file")
    n = buf[3]
    return torch.frombuffer(bytearray(buf[4 + 4 * n:]), dtype=torch.uint8).reshape(struct.unpack(f">{n}I", buf[4:4 + 4 * n]))

def _download(dataset_cls, data_dir, missing, offline):
    """torchvision's download into data_dir; a failed one removes what it created (data_dir/<Class>/raw/..., archives)."""
    root = Path(data_dir)
    listing = lambda: ({*root.iterdir(), *root.joinpath(dataset_cls.__name__).rglob("*")} if root.is_dir() else set())
    before, top = listing(), next((q for q in reversed([root, *root.absolute().parents]) if not q.exists()), None)  # top: made by it
    try:
        dataset_cls(data_dir, download=True)
    except Exception as e:
        for q in sorted(listing() - before, key=lambda q: -len(q.parts)) if top is None else [top]:  # the deepest first
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() and not q.is_symlink() else q.unlink(missing_ok=True)
        fail(f"{missing} and the download failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}); offline: {offline}")

def _mnist_like(name, data_dir):
    """--data-dir, then <data-dir>/<MNIST|FashionMNIST>/raw, then (Fashion) Debian's files, then download."""
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    dirs = [data_dir, os.path.join(data_dir, sub, "raw")] + ([DEBIAN_FASHION] if sub == "FashionMNIST" else [])
    def find():
        for d in dirs:
            paths = [next((p for p in (f"{d}/{f}", f"{d}/{f}.gz") if os.path.isfile(p)), None)
                     for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
            if all(paths):
                return paths
    if find() is None:
        _download(getattr(torchvision.datasets, sub), data_dir, f"{name}: no files in {', '.join(dirs)}",
                  "apt-get install dataset-fashion-mnist" if sub == "FashionMNIST" else "--data-dir DIR")
    x_tr, y_tr, x_te, y_te = (_read_idx(p) for p in find())
    return x_tr[:, None], y_tr.long(), x_te[:, None], y_te.long()

_NUMPY = {"_reconstruct": np.zeros(0).__reduce__()[0], "_frombuffer": np.zeros(1).__reduce_ex__(5)[0], "scalar": np.int64(0).__reduce__()[0],
          "ndarray": np.ndarray, "dtype": np.dtype}  # what numpy arrays and scalars pickle as

class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch as data: dicts, lists, bytes, numbers and numpy arrays; any other global (a function
    that would run, e.g. os.system) is refused, so a crafted batch file cannot run code."""
    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric", "numpy") and name in _NUMPY:
            return _NUMPY[name]
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles made by Python 3 spell bytes
            return lambda text, encoding="utf-8": text.encode(encoding)
        raise pickle.UnpicklingError(f"it names {module}.{name}")

def _cifar10(data_dir):
    root = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(root):
        _download(torchvision.datasets.CIFAR10, data_dir, f"cifar10: no {root}", "--data-dir DIR")
    def batch(path):  # {b"data": uint8 (N, 3072), b"labels": N ints in 0..9, ...}: a python-pickle batch of the official archive
        try:
            with open(path, "rb") as f:
                b = _BatchUnpickler(f, encoding="bytes").load()
            x, y = b[b"data"], [int(v) for v in b[b"labels"]]
            ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072 and len(y) == len(x)
        except Exception as e:  # refused global, truncated file, missing key, labels of the wrong type
            fail(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                 "only numpy arrays, lists, dicts, bytes and numbers are read")
        if not ok or not all(0 <= v < 10 for v in y):
            fail(f"{path}: not a CIFAR-10 batch (data must be uint8 of shape (N, 3072) with N labels in 0..9)")
        return torch.from_numpy(x.copy()).reshape(-1, 3, 32, 32), torch.tensor(y)
    x, y = zip(*(batch(os.path.join(root, n)) for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]))
    return torch.cat(x[:5]), torch.cat(y[:5]), x[5], y[5]

def _folder(path, size):
    """Every image under path, resized (shorter side) and center-cropped to size; every 20th is test; unreadable ones are skipped and counted."""
    import torchvision.transforms.functional as TF
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"))
    load, x, bad = torchvision.datasets.folder.pil_loader, [], []  # PIL (a torchvision dependency), converted to RGB
    for f in files:
        try:
            x.append(TF.pil_to_tensor(TF.center_crop(TF.resize(load(str(f)), size), size)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated or odd files
            bad.append(f"{f} ({type(e).__name__})")
    if bad and int(os.environ.get("RANK", 0)) == 0:
        print(f"folder:{path}: skipped {len(bad)} unreadable file(s) of {len(files)}, e.g. {bad[0]}", flush=True)
    if len(x) < 2:
        fail(f"folder:{path}: found {len(x)} readable images (png, jpg, bmp, gif, webp); needs at least 2")
    x, test = torch.stack(x), torch.arange(len(x)) % 20 == 0
    return x[~test], None, x[test], None

def toy_sample(name, n, generator):
    """n points (n, 2) of a 2D toy density of the FFJORD experiments (Grathwohl et al. 2019)."""
    r, rn = (lambda *s: torch.rand(*s, generator=generator)), (lambda *s: torch.randn(*s, generator=generator))
    if name == "moons":  # two interleaved half circles, noise 0.1, scaled x2 and shifted
        t, upper = r(n) * math.pi, r(n) < 0.5
        x = torch.stack([torch.where(upper, t.cos(), 1 - t.cos()), torch.where(upper, t.sin(), 0.5 - t.sin())], 1)
        return (x + 0.1 * rn(n, 2)) * 2 + torch.tensor([-1.0, -0.2])
    if name == "circles":  # radii 3 and 1.5, noise 0.08 * 3
        t, radius = r(n) * 2 * math.pi, torch.where(r(n) < 0.5, 1.0, 0.5)
        return (radius[:, None] * torch.stack([t.cos(), t.sin()], 1) + 0.08 * rn(n, 2)) * 3
    if name == "8gaussians":  # std 0.5 around 8 points on a circle of radius 4, all divided by 1.414
        a = torch.randint(8, (n,), generator=generator) * math.pi / 4
        return (0.5 * rn(n, 2) + 4 * torch.stack([a.cos(), a.sin()], 1)) / 1.414
    if name == "checkerboard":  # uniform on the 8 dark squares of a 4 x 4 board of side 8
        x1 = r(n) * 4 - 2
        x2 = r(n) - torch.randint(2, (n,), generator=generator) * 2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], 1) * 2
    if name == "pinwheel":  # 5 arms: radial std 0.3, tangential std 0.1, twist rate 0.25
        k = torch.randint(5, (n,), generator=generator)
        f = rn(n, 2) * torch.tensor([0.3, 0.1]) + torch.tensor([1.0, 0.0])
        a = k * 2 * math.pi / 5 + 0.25 * f[:, 0].exp()
        return 2 * torch.stack([f[:, 0] * a.cos() + f[:, 1] * a.sin(), -f[:, 0] * a.sin() + f[:, 1] * a.cos()], 1)
    if name == "swissroll":  # t in [1.5 pi, 4.5 pi], noise 1, divided by 5
        t = 1.5 * math.pi * (1 + 2 * r(n))
        return (torch.stack([t * t.cos(), t * t.sin()], 1) + rn(n, 2)) / 5
    if name == "2spirals":
        m = r(n).sqrt() * 540 * 2 * math.pi / 360
        d = torch.stack([-m.cos() * m + 0.5 * r(n), m.sin() * m + 0.5 * r(n)], 1)
        return torch.where(r(n, 1) < 0.5, d, -d) / 3 + 0.1 * rn(n, 2)
    fail(f"toy density {name!r} unknown; accepted: {', '.join(TOY_SETS)}")

def moving_digits(digits, n, frames, size, generator):
    """Moving MNIST (Srivastava et al. 2015): 2 digits bounce in a size^2 frame, speed 0.1 of the free range per
    frame, overlaps keep the brighter pixel. digits uint8 (N, 1, d, d) -> uint8 (n, frames, 1, size, size)."""
    d, lim = digits.shape[-1], size - digits.shape[-1]
    if lim < 0:
        fail(f"--frame-size {size} is smaller than a digit ({d})")
    src = digits[torch.randint(len(digits), (n, 2), generator=generator)].reshape(n, 1, 2 * d * d)
    a = torch.rand(n, 2, 1, generator=generator) * 2 * math.pi
    v = 0.1 * lim * torch.cat([a.sin(), a.cos()], -1)  # (n, 2 digits, 2 coords)
    p = torch.rand(n, 2, 1, 2, generator=generator) * lim + v[:, :, None] * torch.arange(frames)[:, None]  # (n, 2, T, 2)
    p = (lim - ((p % (2 * lim + 1e-9)) - lim).abs()).round().long()  # reflected at the walls: in [0, lim]
    ar = torch.arange(d)
    idx = (p[..., 0, None, None] + ar[:, None]) * size + p[..., 1, None, None] + ar  # (n, 2, T, d, d)
    idx = idx.permute(0, 2, 1, 3, 4).reshape(n * frames, 2 * d * d)  # (n*T, 2*d*d)
    canvas = torch.zeros(n * frames, size * size, dtype=torch.uint8)
    canvas.scatter_reduce_(1, idx, src.expand(n, frames, -1).reshape(n * frames, -1), reduce="amax")
    return canvas.reshape(n, frames, 1, size, size)

def load_data(cfg):
    """The dataset cfg.dataset names; images stay uint8, so their 8-bit values are exact."""
    name, seed = cfg.dataset, torch.Generator().manual_seed(12345)  # fixed test sets
    if name in TOY_SETS:  # training points are drawn fresh for every batch
        if cfg.eval_n > 10 ** 6:
            fail(f"--eval-n {cfg.eval_n}: a toy test set holds at most 1000000 points")
        test = toy_sample(name, cfg.eval_n or 10000, seed)
        return Data(name, "toy", (2,), test[:0], test)
    base = {"moving-mnist": "mnist", "moving-fashion": "fashion-mnist"}.get(name, name)
    parts = (_mnist_like(base, cfg.data_dir) if base in ("mnist", "fashion-mnist") else
             _cifar10(cfg.data_dir) if base == "cifar10" else _folder(name[7:], cfg.image_size))
    if name in VIDEO_SETS:  # the training digits make fresh videos for every batch
        test = moving_digits(parts[2], cfg.eval_n or 1000, cfg.frames, cfg.frame_size, seed)
        return Data(name, "video", tuple(test.shape[1:]), parts[0], test)
    return Data(name, "image", tuple(parts[0].shape[1:]), parts[0], parts[2], parts[1], parts[3])

class Batches:
    """Endless training batches on the device. Images: shuffled per epoch by a DistributedSampler (each DDP rank
    its own shard), floats in [0, 1] equal to k/255, binarized if cfg.binarize. Toy data, videos: fresh draws."""
    def __init__(self, data, cfg, run, hflip=False, labels=False):
        self.data, self.cfg, self.run, self.hflip, self.labels = data, cfg, run, hflip, labels
        self.b, self.epoch, self.pos, self.idx = cfg.batch_size // run.world, 0, 0, None
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + run.rank)
        if data.kind == "toy" and self.b > 10 ** 5 or data.kind == "video" and self.b * math.prod(data.shape) * 4 > 2 ** 31:
            fail(f"--batch-size {cfg.batch_size} is too large for {data.kind} data; accepted: at most "
                 + ("100000 points" if data.kind == "toy" else f"{2 ** 31 // (4 * math.prod(data.shape))} videos (2 GiB of frames)") + " per process")
        if data.kind == "image":
            if len(data.train) // run.world < self.b:
                fail(f"--batch-size {cfg.batch_size} exceeds the {len(data.train)} training images")
            self.x, self.y = data.train.to(run.device), None if data.train_labels is None else data.train_labels.to(run.device)
            self.sampler = torch.utils.data.DistributedSampler(range(len(data.train)), run.world, run.rank, seed=cfg.seed, drop_last=True)
            self._epoch()
    def _epoch(self):
        self.sampler.set_epoch(self.epoch)
        self.idx = torch.tensor(list(self.sampler), device=self.run.device)
    def __next__(self):
        kind, y = self.data.kind, None
        if kind == "toy":
            return toy_sample(self.data.name, self.b, self.gen).to(self.run.device)
        if kind == "video":
            x = moving_digits(self.data.train, self.b, self.cfg.frames, self.cfg.frame_size, self.gen).to(self.run.device)
        else:
            if self.pos + self.b > len(self.idx):
                self.epoch, self.pos = self.epoch + 1, 0
                self._epoch()
            i = self.idx[self.pos:self.pos + self.b]
            self.pos += self.b
            x, y = self.x[i], (self.y[i] if self.y is not None else None)
        x = x.float() / 255
        if self.hflip:  # random horizontal flips
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
        x = torch.bernoulli(x) if self.cfg.binarize else x
        return (x, y) if self.labels else x
    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "gen": self.gen.get_state()}
    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]
        self.gen.set_state(s["gen"]) if self.run.world == 1 else None  # (under DDP each rank keeps its own seeded generator)
        self._epoch() if self.data.kind == "image" else None

def progress(items, label, every=10.0):
    """Yields the items (a list), printing label at once, then `label: 3/10 batches, 12s, about 28s left` every 10 s."""
    t0 = last = time.time()
    print(label, flush=True)
    for i, item in enumerate(items, 1):
        yield item
        if (now := time.time()) - last >= every and i < len(items):
            last = now
            print(f"{label}: {i}/{len(items)} batches, {now - t0:.0f}s, about {(now - t0) * (len(items) - i) / i:.0f}s left", flush=True)

def test_batches(data, cfg, device, batch_size, label=None):
    """The first cfg.eval_n test examples (all if 0) as floats on device, binarized with a fixed seed; a label prints their count and progress."""
    x, gen = data.test[:cfg.eval_n or None], torch.Generator().manual_seed(1234)
    starts = range(0, len(x), batch_size)
    for i in progress(starts, f"evaluate: {label}: {len(x)} test examples") if label else starts:
        xb = x[i:i + batch_size]
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        yield (torch.bernoulli(xb, generator=gen) if cfg.binarize else xb).to(device)

# ----------------------------------------------------------------------------- run setup
@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; None = fp32
    rank: int
    world: int
    out: Path
    main: bool  # rank 0: the only one that prints and writes
    fused: bool  # fused Adam/AdamW kernels exist here (CUDA, CPU)
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
    def print(self, *a):
        return print(*a, flush=True) if self.main else None

def setup(cfg, method, train=True):
    """Device, DDP (when launched by torchrun), seeds, precision, TF32, the run folder."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    kind = cfg.device if cfg.device != "auto" else "cuda" if cuda else "mps" if mps else "cpu"
    if kind == "cuda" and not cuda or kind == "mps" and not mps:
        fail(f"--device {kind} is not available here; accepted: auto, cpu" + (", cuda" if cuda else "") + (", mps" if mps else ""))
    device = torch.device("cuda", local) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":  # this process's GPU; TF32 matmuls and convolutions
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)  # a clean exit: Gloo aborts if torn down at interpreter exit
        if cfg.batch_size % world:
            fail(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(cfg.seed + rank)
    prec = cfg.precision if cfg.precision != "auto" else "bf16" if kind == "cuda" else "fp32"
    if prec == "fp16" and kind == "cpu":
        fail("--precision fp16 needs a GPU; accepted on cpu: auto, fp32, bf16")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    run = Run(device, dtype, rank, world, Path(cfg.out), rank == 0, kind in ("cuda", "cpu"))
    if train and run.main:
        with writing(run.out / "config.json"):
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        print(f"{method} | {cfg.dataset} | {device} {prec} | {world} process(es) | {cfg.out}", flush=True)
    return run

def wrap(model, run, cfg):
    """What the training loop calls: DDP across ranks, then torch.compile if asked (save/evaluate `model`)."""
    ids = [run.device.index] if run.device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids) if run.world > 1 else model
    return torch.compile(net) if cfg.compile else net

def every(step, n):
    return n > 0 and step % n == 0

def ddp_check(model, run):
    """Under DDP: the largest difference of any rank's parameters from rank 0's (0 = in sync)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    dist.broadcast(ref := flat.clone(), 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    run.print(f"ddp: max parameter difference across {run.world} ranks = {diff.item():.3g}")
    return diff.item()

class Stop:
    """Ctrl-C/SIGTERM: stop after this step and save; a 2nd signal exits at once (the last checkpoint stays). DDP ranks
    agree at log steps. After the final checkpoint, exit_if_stopped exits with 128 + the signal (130, 143)."""
    def __init__(self, run, cfg):
        self.run, self.cfg, self.signum, self.stopped, self.exiting, self.old = run, cfg, 0, False, False, {}
    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self
    def _handle(self, signum, frame):
        if self.signum:  # the second signal
            self.run.print(f"\nsignal {signum} again: exiting now; the last checkpoint {self.cfg.ckpt} is kept")
            if self.exiting:  # the checkpoint is written and the interpreter is tearing down: at once
                os._exit(128 + signum)
            raise SystemExit(128 + signum)  # (an interrupted checkpoint write removes its temporary file)
        self.signum = signum
        self.run.print(f"\nsignal {signum}: stopping after this step and saving a checkpoint (again to exit at once)")
    def __exit__(self, *exc):
        for s, h in self.old.items() if not self.signum else ():  # stopping: a 2nd signal while saving still exits cleanly
            signal.signal(s, h)
    def __call__(self, step):
        if self.run.world == 1:
            self.stopped = bool(self.signum)
        elif every(step, self.cfg.log_every):
            dist.all_reduce(f := torch.tensor(float(self.signum), device=self.run.device), op=dist.ReduceOp.MAX)
            self.signum, self.stopped = int(f.item()), bool(f.item())
        return self.stopped
    def exit_if_stopped(self, step):
        if self.stopped:
            self.exiting = True
            self.run.print(f"stopped at step {step}: checkpoint {self.cfg.ckpt}; continue with --resume")
            raise SystemExit(128 + self.signum)

# ----------------------------------------------------------------------------- optimisation
class Update:
    """loss.backward(), clipping, optimizer.step(). A step with a non-finite loss, gradient norm or buffer (batch-norm statistics) is
    skipped, counted (VD-VAE style), its buffers kept: on the device (no host sync) for fused optimizers, else after a host check."""
    def __init__(self, optimizer, model, run, clip=0.0, patience=20, diverge=10.0, diverge_steps=100):
        params, bufs = (model.parameters(), list(model.buffers())) if isinstance(model, nn.Module) else (model, [])
        self.opt, self.params, self.clip, self.patience = optimizer, [p for p in params if p.requires_grad], clip, patience
        self.diverge, self.diverge_steps, self.bufs, self.saved = diverge, diverge_steps, bufs, [b.detach().clone() for b in bufs]
        self.finite = [b for b in bufs if b.is_floating_point() and torch.isfinite(b).all()]  # (not e.g. a -inf mask)
        self.scaler = torch.amp.GradScaler(run.device.type) if run.dtype == torch.float16 else None
        # skipped steps in all and in a row; steps in a row above the divergence bound; L_1, the first finite loss
        self.skipped, self.streak, self.high, self.first = (torch.tensor(v, device=run.device) for v in (0.0, 0.0, 0.0, math.nan))
    def bound(self):  # the loss above which training counts as diverging
        return self.first + self.diverge * (self.first.abs() + 1)
    def __call__(self, loss):
        if loss.requires_grad or torch.isfinite(loss).item():  # (a non-finite loss without a graph, e.g. a failed solve: skipped)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.scaler.unscale_(self.opt) if self.scaler else None
        norm = nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        l = loss.detach().float()
        buf_norms = torch.stack(torch._foreach_norm(self.finite)) if self.finite else norm
        bad = (~torch.isfinite(l) | ~torch.isfinite(norm) | ~torch.isfinite(buf_norms).all()).float()
        if self.scaler:  # skips non-finite steps itself
            self.scaler.step(self.opt), self.scaler.update()
        elif getattr(self.opt, "_step_supports_amp_scaling", False):  # fused kernels skip when found_inf = 1
            self.opt.found_inf, self.opt.grad_scale = bad, None
            self.opt.step()
            del self.opt.found_inf, self.opt.grad_scale
        elif not bad.item():
            self.opt.step()
        if self.bufs:  # a skipped step leaves every buffer as it was
            torch._foreach_copy_(self.bufs, [torch.where(bad.bool(), old, b) for b, old in zip(self.bufs, self.saved)])
            torch._foreach_copy_(self.saved, self.bufs)
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.first = torch.where(torch.isnan(self.first) & ~bad.bool(), l, self.first)
        self.high = (self.high + 1) * ((l > self.bound()) | bad.bool()).float() if self.diverge > 0 else self.high
        return norm
    def check(self, streak, high=0.0):
        if streak >= self.patience:
            fail(f"{int(streak)} non-finite losses in a row ({int(self.skipped.item())} skipped in all); "
                 "lower --lr, use --precision fp32, or clip gradients")
        if high >= self.diverge_steps:
            fail(f"the loss stayed above {self.bound().item():.4g} = L_1 + {self.diverge:g} (|L_1| + 1), L_1 = {self.first.item():.4g} "
                 f"the first loss, for {int(high)} steps: diverged; lower --lr (--diverge 0 never stops for this)")
    def state_dict(self):
        return {"skipped": self.skipped, "first": self.first, "scaler": self.scaler.state_dict() if self.scaler else {}}
    def load_state_dict(self, s):
        self.skipped.copy_(s["skipped"])
        self.first.copy_(s.get("first", self.first))
        torch._foreach_copy_(self.saved, self.bufs) if self.bufs else None  # the model was loaded first (common.resume)
        if self.scaler and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])

class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after update t = 1, 2, ..., d = min(decay, (1 + t) / (10 + t)) (TF's warm-up, as in
    score_sde: the initial weights fade within a few hundred steps, not ~5 / (1 - decay)), or d = decay with warmup=False; buffers copied."""
    def __init__(self, model, decay, warmup=True):
        self.decay, self.warmup, self.model = decay, warmup, copy.deepcopy(model).eval().requires_grad_(False)
    @torch.no_grad()
    def update(self, model, t):
        d = min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
    def state_dict(self):
        return self.model.state_dict()
    def load_state_dict(self, s):
        self.model.load_state_dict(s)

# ----------------------------------------------------------------------------- logging, metrics, images
class Logger:
    """`step 1200/50000 | loss 1.234 | bpd 3.45 | 14.2 it/s | eta 58m` every cfg.log_every steps, and metrics.jsonl.
    Terms are summed on the device and read once per line: no per-step host-device synchronisation."""
    def __init__(self, cfg, run, step, update=None):
        self.cfg, self.run, self.update, self.keys, self.t, self.last = cfg, run, update, None, time.time(), step
    def __call__(self, step, terms):
        v = torch.stack([torch.as_tensor(t, device=self.run.device).detach().float().reshape(()) for t in terms.values()])
        if tuple(terms) != self.keys:
            self.keys, self.sum, self.count = tuple(terms), torch.zeros_like(v), torch.zeros_like(v)
        ok = torch.isfinite(v)  # a skipped non-finite step does not spoil the average
        self.sum, self.count = self.sum + torch.where(ok, v, 0.0), self.count + ok
        if every(step, self.cfg.log_every) or step == self.cfg.steps:
            self.flush(step)
    def flush(self, step):
        u = self.update
        extra = torch.stack([u.skipped, u.streak, u.high, u.bound()]) if u else self.sum[:0]
        if u and self.run.world > 1:  # DDP ranks see different losses: all take the same decision in check()
            dist.all_reduce(extra, op=dist.ReduceOp.MAX)
        mean = torch.where(self.count > 0, self.sum / self.count.clamp_min(1), math.nan)  # all skipped: nan, never 0
        vals = torch.cat([mean, extra]).tolist()  # the one sync per log line
        its, self.t, self.last = (step - self.last) / max((now := time.time()) - self.t, 1e-9), now, step
        self.sum, self.count = self.sum * 0, self.count * 0
        rec = {"step": step, "split": "train", **dict(zip(self.keys, vals)), "it_s": its}
        line = f"step {step}/{self.cfg.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in zip(self.keys, vals))
        if u:
            skipped, streak, high, bound = vals[-4:]
            rec["skipped"] = int(skipped)
            line += f" | skipped {int(skipped)}" if skipped else ""
            line += f" | diverging? loss above {bound:.4g} (or skipped) for {int(high)} steps" if high >= 10 else ""
        eta = (self.cfg.steps - step) / max(its, 1e-9)
        self.run.print(f"{line} | {its:.1f} it/s | eta " + (f"{eta / 3600:.1f}h" if eta > 5400 else f"{eta / 60:.0f}m"))
        self.write(rec, echo=False)
        u.check(streak, high) if u else None
    def write(self, record, echo=True):  # one record -> metrics.jsonl (nan/inf as null), printed (rank 0)
        if self.run.main:
            if echo:
                print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
            with writing(self.run.out / "metrics.jsonl"):
                self.run.out.mkdir(parents=True, exist_ok=True)
                with open(self.run.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}) + "\n")

def eval_record(step, test_nll, unit, kind, n_test, **extras):
    """What every evaluate() returns: the same keys in every file (DESIGN.md, Metrics); test_nll, kind None: no likelihood."""
    assert unit in ("bpd", "nats") and (kind in ("exact", "bound", "estimate") or test_nll is None and kind is None)
    return {"step": step, "split": "test", "test_nll": test_nll, "unit": unit, "kind": kind, "n_test": n_test, **extras}

def bits_per_dim(nll_nats, dims):
    """Negative log-likelihood in nats of one D-dimensional example -> bits per dimension."""
    return nll_nats / (dims * math.log(2))

def dequantized_bpd(log_density, dims):
    """Bits/dim of 8-bit k from a density of x = (k + u)/256, u ~ U[0,1)^D: -log P(k) <= -log p(x) + D log 256."""
    return bits_per_dim(-log_density + dims * math.log(256), dims)

def save_grid(x, path, nrow=None):
    """Images in [0, 1], (N, C, H, W) -> one PNG grid."""
    with writing(path):
        torchvision.utils.save_image(x.detach().float().clamp(0, 1).cpu(), path, nrow=nrow or max(1, int(math.sqrt(len(x)))), padding=1)

# ----------------------------------------------------------------------------- sample quality: Frechet distance
def fd_label(cfg):  # the name frechet_distance's number must be reported under: never "FID"
    return "FD (torchvision Inception-v3; not the TF-Inception FID of papers)" if cfg.fid_inception else "FD (classifier features)"

def frechet_from_features(f1, f2):
    """Frechet distance of Gaussians fitted to features (N1, D), (N2, D), in float64: ||mu1 - mu2||^2 + Tr(S1 + S2 -
    2 (S1 S2)^1/2), with Tr (S1 S2)^1/2 = sum of the square roots of the eigenvalues (clamped at 0) of S1^1/2 S2 S1^1/2."""
    f1, f2 = f1.double(), f2.double()
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.T  # S1^1/2
    tr = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * tr).item()

def _fd_classifier(data, cfg, run, epochs=2):
    """A small conv net (penultimate layer: 128-d features) trained, seeded, on the training labels (unlabelled data: on 4
    rotations, Gidaris et al. 2018), cached in cfg.cache_dir (key: below); absent or unreadable: (re)trained, with progress lines."""
    path = Path(cfg.cache_dir, "fd-v1-" + re.sub(r"[^\w.-]+", "_", f"{data.name}-{'x'.join(map(str, data.shape))}-{len(data.train)}.pt"))
    rot = lambda x, y: (x, y) if y is not None else (torch.cat([x.rot90(k, (2, 3)) for k in range(4)]), torch.arange(4).repeat_interleave(len(x)))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # seeded; the caller's random streams stay untouched
        torch.manual_seed(0)
        c, k = data.shape[0], 4 if data.train_labels is None else int(data.train_labels.max()) + 1
        block = lambda a, b: (nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
        net = nn.Sequential(*block(c, 32), *block(32, 64), *block(64, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, k)).to(run.device)
        if path.is_file():
            try:
                net.load_state_dict((saved := torch.load(path, map_location=run.device, weights_only=True))["net"])
                run.print(f"FD: classifier {path}, test accuracy {saved['accuracy']:.4f}")
                return net.eval()
            except Exception as e:  # corrupt or another net's: retrained
                run.print(f"FD: the cached classifier {path} is unreadable ({type(e).__name__}); retraining it")
        opt, t0, g = torch.optim.Adam(net.parameters(), 2e-3), time.time(), torch.Generator().manual_seed(0)
        order = [i for _ in range(epochs) for i in torch.randperm(len(data.train), generator=g).split(128)]
        for i in progress(order, f"FD: training its feature classifier once for {data.name} ({epochs} epochs of {len(data.train)} "
                                 f"images, {len(order)} batches; cached in {path})"):  # (frechet_distance runs on rank 0)
            x, y = rot(data.train[i].float() / 255, None if data.train_labels is None else data.train_labels[i])
            opt.zero_grad()
            nn.functional.cross_entropy(net(x.to(run.device)), y.to(run.device)).backward()
            opt.step()
    x, y = rot(data.test.float() / 255, data.test_labels)  # (frechet_distance runs under no_grad)
    acc = sum((net(xb.to(run.device)).argmax(1).cpu() == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500))) / len(y)
    run.print(f"FD: classifier trained in {time.time() - t0:.0f}s, test accuracy {acc:.4f} -> {path}")
    try:
        atomic_save({"net": net.state_dict(), "accuracy": acc}, path) if run.main else None
    except SystemExit as e:  # an unwritable cache folder: retrained next time
        run.print(f"FD: classifier not cached ({e})")
    return net.eval()

def _fd_inception(run):  # torchvision's Inception-v3 pool features (2048-d) of images resized to 299 x 299
    try:
        net = torchvision.models.inception_v3(weights="DEFAULT")
    except Exception as e:
        fail(f"--fid-inception: torchvision's Inception-v3 weights could not be loaded ({type(e).__name__}); "
             f"they are downloaded once, with internet access, into {torch.hub.get_dir()}/checkpoints")
    net.fc, stats = nn.Identity(), torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]], device=run.device)[..., None, None]
    net = net.to(run.device).eval()
    return lambda x: net((nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear") - stats[0]) / stats[1])

_FD_NETS = {}  # feature nets loaded in this process: FD's classifier per data set, Inception-v3

@torch.no_grad()
def classify(x, data, cfg, run):
    """Features (N, 128) and logits (N, K), float64 on the CPU, of images x in [0, 1] by FD's classifier (an independent net trained
    on data's labels; on 4 rotations if unlabelled): what fidelity and diversity numbers of samples are computed from."""
    key = (data.name, data.shape, len(data.train))
    net = _FD_NETS[key] = _FD_NETS.get(key) or _fd_classifier(data, cfg, run)
    f = torch.cat([net[:-1](xb.to(run.device).float()).double().cpu() for xb in x.split(250)])
    return f, f @ net[-1].weight.double().cpu().T + net[-1].bias.double().cpu()

@torch.no_grad()
def frechet_distance(samples, data, cfg, run, n=None):
    """FD (report it as fd_label(cfg)) of the first n samples (images in [0, 1] of data.shape) and test images (binarized, seeded, if cfg.binarize;
    n <= both counts, default all) in classify's or (cfg.fid_inception) Inception-v3's features; biased up at small n: compare at equal n."""
    if data.kind != "image" or tuple(samples.shape[1:]) != tuple(data.shape):
        fail(f"FD needs images of shape {data.shape} of an image data set; got {tuple(samples.shape[1:])} of {data.kind}")
    n = min(n or len(samples), len(samples), len(data.test))
    real = data.test[:n].float() / 255
    real = torch.bernoulli(real, generator=torch.Generator().manual_seed(1234)) if cfg.binarize else real
    if not cfg.fid_inception:
        return frechet_from_features(classify(samples[:n], data, cfg, run)[0], classify(real, data, cfg, run)[0])
    net = _FD_NETS["inception"] = _FD_NETS.get("inception") or _fd_inception(run)
    feats = lambda x: torch.cat([net(xb.to(run.device).float()).double().cpu() for xb in x.split(250)])
    return frechet_from_features(feats(samples[:n]), feats(real))

# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    """torch.save to a temporary file, then os.replace: an interrupted or failed write leaves the old file."""
    tmp = f"{path}.tmp"
    try:
        with writing(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)

def _tensors(obj, name=""):  # every tensor in a nested state, with its dotted name
    if torch.is_tensor(obj):
        yield name, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from _tensors(v, f"{name}.{k}" if name else str(k))

def save_checkpoint(cfg, run, method, step, **parts):
    """cfg.ckpt <- method, step, config, RNG and each part's state_dict() (or value); weights_only-loadable. Non-finite
    weights, buffers or optimizer state are never written: the last good file stays, and training stops."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in parts.items()}
    bad = next((n for n, t in _tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:  # checked on every rank, so DDP ranks stop together
        fail(f"step {step}: {bad} is not finite; not saved, {cfg.ckpt} " + ("keeps the last good checkpoint" if os.path.isfile(cfg.ckpt)
             else "was never written") + "; lower --lr or clip gradients")
    if run.main:
        np_rng = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
               "numpy": torch.from_numpy(np_rng[1].astype(np.int64)), "numpy_pos": int(np_rng[2]), "python": random.getstate()}
        atomic_save({"method": method, "step": step, "config": asdict(cfg), "rng": rng, **state}, cfg.ckpt)

def load_checkpoint(path, methods):
    """torch.load(weights_only=True), refusing pickled objects and other methods' checkpoints."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickled object (a "GLOBAL"), or not a checkpoint at all
        if g := re.search(r"GLOBAL (\S+)", str(e)):
            fail(f"{path} holds a pickled object ({g.group(1)}), not only tensors, numbers and strings: refused (weights_only=True)")
        fail(f"{path} is not a readable checkpoint (UnpicklingError)")
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    found = ckpt.get("method") if isinstance(ckpt, dict) else None
    if found not in methods:
        fail(f"{path} is a checkpoint of {found!r}; accepted: {', '.join(methods)}")
    return ckpt

def load_model_state(model, state, path):
    """model.load_state_dict, refusing a checkpoint whose tensors have other names or shapes."""
    own = model.state_dict()
    bad = [k for k in own if k not in state or own[k].shape != state[k].shape] + [k for k in state if k not in own]
    if bad:
        shape = lambda sd, k: tuple(sd[k].shape) if k in sd else "missing"
        fail(f"{path} does not fit this model: {len(bad)} tensors differ, e.g. {bad[0]}: checkpoint {shape(state, bad[0])} "
             f"vs model {shape(own, bad[0])}; use the checkpoint's config or a new --out")
    model.load_state_dict(state)

def resume(cfg, run, method, model, **parts):
    """With --resume: restore model, parts (optimizer, batches, ...) and RNG from cfg.ckpt; return its step (else 0)."""
    if not cfg.resume:
        return 0
    if not os.path.isfile(cfg.ckpt):
        run.print(f"resume: no checkpoint at {cfg.ckpt} yet; starting at step 0")
        return 0
    ckpt = load_checkpoint(cfg.ckpt, (method,))
    load_model_state(model, ckpt["model"], cfg.ckpt)
    for k, v in parts.items():
        v.load_state_dict(ckpt[k])
    if run.world == 1:  # (under DDP every rank keeps its own seeded streams)
        s = ckpt["rng"]
        torch.set_rng_state(s["torch"])
        if s["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"]))
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    run.print(f"resumed from {cfg.ckpt} at step {ckpt['step']}")
    if ckpt["config"].get("steps", cfg.steps) != cfg.steps:  # a schedule over --steps (cosine, decay stages) is re-stretched
        run.print(f"resume: --steps {cfg.steps} differs from the checkpoint run's {ckpt['config']['steps']}; an lr schedule over --steps now spans {cfg.steps}")
    return ckpt["step"]
