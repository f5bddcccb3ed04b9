"""Shared fixtures: small synthetic data sets written in the real on-disk formats, so tests never
need the network (and run in seconds)."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array):
    """An idx file as MNIST ships it (uint8, big-endian sizes), gzipped if path ends in .gz."""
    raw = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def synthetic_images(n, seed, size=28):
    """Bright rectangles of random size, place and grey level on black: structured 8-bit images."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        h, w = rng.integers(6, 16, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        x[i, r:r + h, c:c + w] = rng.integers(120, 256)
    return x


def rectangles(n, seed, size=8):
    """uint8 (n, 1, size, size) torch images: a bright rectangle (sides 2-5, grey level 120-255) on black."""
    g, x = torch.Generator().manual_seed(seed), torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        h, w = torch.randint(2, 6, (2,), generator=g).tolist()
        r, c = torch.randint(0, size - h + 1, (1,), generator=g).item(), torch.randint(0, size - w + 1, (1,), generator=g).item()
        x[i, 0, r:r + h, c:c + w] = torch.randint(120, 256, (1,), generator=g).item()
    return x


def write_mnist_like(folder, n_train=512, n_test=128, gz=True):
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(f"{folder}/train-images-idx3-ubyte{ext}", synthetic_images(n_train, 0))
    write_idx(f"{folder}/train-labels-idx1-ubyte{ext}", np.arange(n_train) % 10)
    write_idx(f"{folder}/t10k-images-idx3-ubyte{ext}", synthetic_images(n_test, 1))
    write_idx(f"{folder}/t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10)
    return folder


@pytest.fixture(scope="session")
def fd_cache(tmp_path_factory):
    """A --cache-dir for the FD classifiers that tests train: a temporary folder, never the repository's runs/cache."""
    return str(tmp_path_factory.mktemp("fd-cache"))


@pytest.fixture(scope="session", autouse=True)
def repository_untouched():
    """No test writes into the repository's runs/ (caches, run folders) or ~/.cache/explicit-density."""
    places = [os.path.join(ROOT, "runs"), os.path.expanduser("~/.cache/explicit-density")]
    listing = lambda: {p: sorted(os.listdir(p)) if os.path.isdir(p) else None for p in places}
    before = listing()
    yield
    assert listing() == before, "a test wrote into runs/ or ~/.cache/explicit-density"


@pytest.fixture
def one_thread():
    """Small in-process models on 1 thread (2 threads on a shared 2-core machine ran 20x slower); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory):
    """A --data-dir holding synthetic Fashion-MNIST-format files (found before any system copy)."""
    return write_mnist_like(str(tmp_path_factory.mktemp("fashion")))


def run_script(*args, timeout=300, env=None):
    """Run a command from the repository root; return the finished process (output captured)."""
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


PYTHON = sys.executable


D_LIN, K_LIN, S_LIN = 6, 3, 0.5  # the linear-Gaussian model: x in R^6, z in R^3, noise std 0.5


def linear_gaussian(seed=0):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I) with orthogonal columns of W, so the exact posterior is
    the diagonal Gaussian N(m, S), S = (I + W^T W / s^2)^-1, m = S W^T (x - b) / s^2, and
    log p(x) = log N(x; b, W W^T + s^2 I) is exact."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D_LIN, K_LIN, generator=g, dtype=torch.float64))
    W, b = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), torch.randn(D_LIN, generator=g, dtype=torch.float64)
    x = (torch.randn(8, K_LIN, generator=g, dtype=torch.float64) @ W.T + b + S_LIN * torch.randn(8, D_LIN, generator=g, dtype=torch.float64))
    log_px_z = lambda x, z: torch.distributions.Normal(z @ W.T + b, S_LIN).log_prob(x).sum(-1)
    cov = W @ W.T + S_LIN ** 2 * torch.eye(D_LIN, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    S = 1 / (1 + (W ** 2).sum(0) / S_LIN ** 2)
    m = S * ((x - b) @ W) / S_LIN ** 2
    return x, log_px_z, log_px, m, S.log().expand_as(m)
