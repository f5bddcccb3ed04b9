"""pixelcnn.py: causality of every architecture (no output depends on its own or a later sub-pixel, in raster
then R, G, B order), normalisation over all 2x2 binary images, skewing, learning, sampling and the command line."""
import itertools
import json
from pathlib import Path

import pytest
import torch

import common
import pixelcnn
from conftest import PYTHON, run_script

ARCHS = ("pixelcnn", "rowlstm", "diagbilstm")


def model_for(arch, shape, binarize=False, hidden=12, layers=2, seed=0):
    torch.manual_seed(seed)
    return pixelcnn.PixelNet(pixelcnn.Config(arch=arch, hidden=hidden, layers=layers, binarize=binarize), shape).double()


def dependencies(model, shape):
    """(D, D) boolean: row k = which inputs (raster order, then channel) the logits of sub-pixel k depend on."""
    C, H, W = shape
    x = torch.rand(1, *shape, dtype=torch.float64, requires_grad=True)
    out = model(x)  # (1, C, K, H, W)
    v = torch.randn(out.shape[2], dtype=torch.float64)
    rows = []
    for i, j, c in itertools.product(range(H), range(W), range(C)):
        g, = torch.autograd.grad(out[0, c, :, i, j] @ v, x, retain_graph=True)
        rows.append(g[0].permute(1, 2, 0).reshape(-1) != 0)  # (H, W, C) flattened: raster, then R, G, B
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("C", (1, 3))
def test_no_output_depends_on_its_own_or_a_later_input(arch, C):
    shape = (C, 5, 5)
    dep = dependencies(model_for(arch, shape), shape)
    D = dep.shape[0]
    assert not dep.triu().any(), "a logit depends on its own or a later sub-pixel"  # diagonal included: exact zeros
    assert dep[1:].any(1).all(), "some sub-pixel after the first sees no earlier input"
    if C == 3:  # inside a pixel: G sees R, B sees R and G (the colour masks)
        for p in range(25):
            assert dep[3 * p + 1, 3 * p] and dep[3 * p + 2, 3 * p] and dep[3 * p + 2, 3 * p + 1]
    if arch == "diagbilstm":  # the whole context x_<k but one sub-pixel: in column 0, the last sub-pixel of the
        # row above (B of x_{i-1,W-1}) - the shifted right-to-left direction reads it only through mask-B features at
        # its own position, and the 7x7 stem reaches 3 columns. The paper's design, kept.
        missing = {(k, q) for k in range(D) for q in range(k) if not dep[k, q]}
        known = {(k, q) for k in range(C * 5, D) for q in range(k) if (k // C) % 5 == 0 and q == k // C * C - 1}
        assert missing == known, sorted(missing ^ known)[:5]


def test_row_lstm_kernels_are_the_papers_k_by_1_along_the_row():
    """Docstring: K^is is (1, k) in (height, width), K^ss a length-k kernel along the previous row (paper: "k x 1")."""
    layer = pixelcnn.RowLSTM(6, 3, k=3)
    assert tuple(layer.i2s.weight.shape[2:]) == (1, 3) and layer.s2s.kernel_size == (3,)
    assert layer.i2s.mask[:, :, 0, 2].sum() == 0 and layer.i2s.mask[:, :, 0, 0].all()  # the right tap is off, the left on


def test_skew_and_unskew_are_inverse():
    x = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)
    s = pixelcnn.skew(x)
    assert s.shape == (2, 3, 4, 8) and torch.equal(pixelcnn.unskew(s, 5), x)
    for i in range(4):  # row i starts at column i, zeros elsewhere
        assert torch.equal(s[:, :, i, i:i + 5], x[:, :, i]) and not s[:, :, i, :i].any() and not s[:, :, i, i + 5:].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_probabilities_of_all_2x2_binary_images_sum_to_one(arch):
    model = model_for(arch, (1, 2, 2), binarize=True, hidden=4)
    images = torch.tensor(list(itertools.product((0.0, 1.0), repeat=4)), dtype=torch.float64).view(16, 1, 2, 2)
    log_p = pixelcnn.log_prob(model, images)
    assert torch.allclose(torch.logsumexp(log_p, 0), torch.zeros((), dtype=torch.float64), atol=1e-10)
    assert log_p.max() - log_p.min() > 1e-3  # a non-trivial (random) distribution


def test_softmax_likelihood_of_a_uniform_model_is_8_bpd():
    model = model_for("pixelcnn", (3, 4, 4))
    for p in model.net[-1].parameters():  # zero last layer: all 256 logits equal
        torch.nn.init.zeros_(p)
    x = torch.randint(0, 256, (2, 3, 4, 4)).double() / 255
    _, terms = pixelcnn.nll_loss(model(x), x, False)
    assert abs(terms["bpd"].item() - 8.0) < 1e-12


def synthetic(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, *shape, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, shape[1] - 3, (2,), generator=g)
        x[i, :, r:r + 3, c:c + 3] = torch.randint(150, 256, (shape[0], 1, 1), generator=g).to(torch.uint8)
    return common.Data("synthetic", "image", shape, x[: n - 32], x[n - 32:])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_test_nll(arch):
    data = synthetic((1, 8, 8), 544)
    cfg = pixelcnn.Config(arch=arch, hidden=8, layers=1, batch_size=16, lr=3e-3)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    torch.manual_seed(0)
    model = pixelcnn.PixelNet(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    update, batches = common.Update(opt, model.parameters(), run, clip=1.0), common.Batches(data, cfg, run)
    before = pixelcnn.evaluate(model, data, cfg, run, 0)
    for _ in range(60):
        x = next(batches)
        loss, _ = pixelcnn.nll_loss(model(x), x, False)
        opt.zero_grad()
        update(loss)
    after = pixelcnn.evaluate(model, data, cfg, run, 60)
    assert before["unit"] == "bpd" and before["kind"] == "exact" and 7.5 < before["test_nll"] < 8.5
    assert after["test_nll"] < before["test_nll"] - 2.0, (before, after)


def test_sampling_and_completion_keep_the_given_rows():
    model = model_for("rowlstm", (3, 4, 4)).float()
    x = pixelcnn.sample(model, 3, "cpu")
    assert x.shape == (3, 3, 4, 4) and torch.equal(x, (x * 255).round() / 255)  # 8-bit values
    given = torch.rand(2, 3, 4, 4)
    grid = pixelcnn.complete(model, given)
    assert grid.shape == (6, 3, 4, 4) and torch.equal(grid[:2], given) and not grid[2:4, :, 2:].any()
    assert torch.equal(grid[4:, :, :2], given[:, :, :2])  # the upper half is kept, the lower half sampled
    binary = model_for("pixelcnn", (1, 3, 3), binarize=True).float()
    assert set(pixelcnn.sample(binary, 4, "cpu").unique().tolist()) <= {0.0, 1.0}


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--hidden", "4", "--layers", "1", "--batch-size", "8",
            "--eval-n", "16", "--n-samples", "2", "--n-complete", "2", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "pixelcnn.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "test_nll" in p.stdout
    for name in ("ckpt.pt", "config.json", "samples_2.png", "complete_2.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "pixelcnn.py", "--steps", "3", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "pixelcnn.py", "--eval", "--sample", "2", "--ckpt", str(out / "ckpt.pt"), "--data-dir", fake_fashion)
    assert p.returncode == 0 and "images/s" in p.stdout and (out / "sample.png").is_file(), p.stderr
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 3 and rec["split"] == "test" and rec["unit"] == "bpd" and rec["kind"] == "exact"
    assert rec["n_test"] == 16 and 0 < rec["test_nll"] < 9


def test_bad_flags_stop_with_one_clear_line(tmp_path, capsys):
    parse = lambda *a: pixelcnn.train(common.parse_config(pixelcnn.Config, pixelcnn.PRESETS, pixelcnn.METHOD, list(a)))
    with pytest.raises(SystemExit, match="--arch 'lstm' unknown; accepted: pixelcnn, rowlstm, diagbilstm"):
        parse("--arch", "lstm")
    with pytest.raises(SystemExit, match="--steps 0 out of range"):
        parse("--steps", "0")
    with pytest.raises(SystemExit, match="--n-samples -1 out of range; accepted: integers >= 0"):
        parse("--n-samples", "-1")
    with pytest.raises(SystemExit, match="pixelcnn.py models images; --dataset moons holds toy data"):
        parse("--dataset", "moons", "--out", str(tmp_path / "m"))


def test_hidden_must_split_into_colour_groups():
    with pytest.raises(SystemExit, match="divisible by the 3 colour channels"):
        pixelcnn.PixelNet(pixelcnn.Config(hidden=8), (3, 8, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_reproduction_copies_learned_from_context(arch):
    """Binary 4x4 images, every pixel equal to the first, x_00 ~ Bernoulli(1/2): the data entropy is log 2 = 0.69 nats
    per image, a factorized model needs 16 log 2 = 11.1. An autoregressive model must reach < 1.2 nats (exact test NLL)
    after 150 seeded steps."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1056, 1, 1, 1, generator=g) < 0.5).to(torch.uint8).expand(-1, 1, 4, 4) * 255
    data = common.Data("copies", "image", (1, 4, 4), x[:1024].contiguous(), x[1024:].contiguous())
    cfg = pixelcnn.Config(arch=arch, hidden=8, layers=1, batch_size=32, lr=1e-2, binarize=True)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    torch.manual_seed(0)
    model = pixelcnn.PixelNet(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = common.Batches(data, cfg, run)
    for _ in range(150):
        xb = next(batches)
        loss, _ = pixelcnn.nll_loss(model(xb), xb, True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec = pixelcnn.evaluate(model, data, cfg, run, 150)
    assert rec["unit"] == "nats" and rec["kind"] == "exact" and rec["n_test"] == 32
    assert rec["test_nll"] < 1.2, rec
