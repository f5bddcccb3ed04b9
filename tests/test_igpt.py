"""igpt.py: causality of the attention, cached = uncached sampling, the k-means palette, a normalized distribution
over all sequences, learning, the linear probe, and the command line end to end."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import common
import igpt
from conftest import PYTHON, run_script


def tiny(shape=(1, 4, 4), vocab=256, palette=None, **kw):
    torch.manual_seed(0)
    cfg = igpt.Config(**{**dict(layers=2, width=32, heads=4), **kw})
    return igpt.IGPT(cfg, shape, vocab, palette).eval(), cfg


def test_logits_never_depend_on_the_current_or_later_pixels():
    model, _ = tiny()
    n, V = model.n, model.vocab
    x = torch.randint(0, V, (1, n))
    onehot = torch.nn.functional.one_hot(x, V + 1).float().requires_grad_()  # (1, n, V+1) data tokens
    start = torch.nn.functional.one_hot(torch.full((1, 1), V), V + 1).float()
    logits = model(torch.cat([start, onehot[:, :-1]], 1))  # the AR input [start, x_1..x_{n-1}]
    for k in range(n):
        (g,) = torch.autograd.grad(logits[0, k].square().sum(), onehot, retain_graph=True)
        assert (g[0, k:] == 0).all(), k  # exactly zero for positions >= k
        assert k == 0 or g[0, :k].abs().sum() > 0, k  # and some earlier position matters
    bert, _ = tiny(objective="bert")  # BERT attends in both directions
    onehot = torch.nn.functional.one_hot(x, V + 1).float().requires_grad_()
    (g,) = torch.autograd.grad(bert(onehot)[0, 0].square().sum(), onehot)
    assert g[0, 1:].abs().sum() > 0


@pytest.mark.parametrize("prefix", [0, 7])
def test_cached_sampling_equals_uncached(prefix):
    model, _ = tiny()
    x = torch.randint(0, 256, (4, model.n))
    tokens, logits = [], []
    for cache in (True, False):
        g = torch.Generator().manual_seed(3)
        t, lg = igpt.sample(model, 4, "cpu", prefix=x[:, :prefix] if prefix else None, cache=cache, generator=g)
        tokens.append(t), logits.append(lg)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0][:, :prefix], x[:, :prefix])
    with torch.no_grad():
        full = model(igpt.ar_input(model, tokens[0]))  # one full forward over the sampled sequence, (4, n, 256)
        kv = model.new_cache(4, "cpu", torch.float32)  # the prefill sample() runs, all of its outputs kept here
        prefill = model(igpt.ar_input(model, tokens[0])[:, :prefix + 1], cache=kv, pos=0)
    assert logits[0].shape == logits[1].shape == (4, model.n - prefix, 256)  # the logits of the sampled positions
    assert (logits[0] - full[:, prefix:]).abs().max() < 1e-5 and (logits[1] - full[:, prefix:]).abs().max() < 1e-5
    assert (prefill - full[:, :prefix + 1]).abs().max() < 1e-5  # the start token and the prefix's positions


def test_kmeans_palette_round_trip():
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (300, 3), generator=g)
    images = colours[torch.randint(0, 300, (20, 8, 8), generator=g)].permute(0, 3, 1, 2)  # (20, 3, 8, 8) of <= 300 colours
    palette = igpt.kmeans_palette(images.permute(0, 2, 3, 1).reshape(-1, 3), 512, 10, g)
    model, _ = tiny((3, 8, 8), 512, palette)
    x = images.float() / 255
    tokens = igpt.tokenize(model, x)
    assert tokens.shape == (20, 64) and torch.equal(igpt.detokenize(model, tokens), x)  # exact round trip
    # arbitrary colours: 512 centroids quantize better than the uniform 8 x 8 x 8 grid (RMSE 32 / sqrt(12) = 9.24)
    px = torch.randint(0, 256, (20000, 3), generator=g)
    palette = igpt.kmeans_palette(px, 512, 10, g)
    rmse = (palette[igpt.nearest(px.float(), palette)] - px).square().mean().sqrt().item()
    assert rmse < 32 / math.sqrt(12), rmse


def test_probabilities_of_all_sequences_sum_to_one():
    model, _ = tiny((1, 2, 2), 2)  # 2 tokens, length 4: 16 sequences
    x = torch.tensor(list(itertools.product([0, 1], repeat=4)))
    with torch.no_grad():
        p = igpt.log_prob(model, x).double().exp()
    assert abs(p.sum().item() - 1) < 1e-5 and (p > 0).all()


def synthetic(n, size=8, seed=0):
    """8-bit bright squares on black, labelled by whether the square is in the top or the bottom half."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.zeros(n, 1, size, size, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size - 3, (2,), generator=g).tolist()
        x[i, :, r:r + 3, c:c + 3] = 200
        y[i] = int(r >= (size - 3) / 2)
    return x, y


def test_short_run_lowers_the_loss_and_the_probe_reads_the_features():
    xtr, ytr = synthetic(512)
    xte, yte = synthetic(128, seed=1)
    data = common.Data("synthetic", "image", (1, 8, 8), xtr, xte, ytr, yte)
    model, cfg = tiny((1, 8, 8), 256, batch_size=32, eval_n=64, probe_n=256)
    model.train()
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches, losses = common.Batches(data, cfg, run), []
    for _ in range(150):
        loss, terms = igpt.objective(model, igpt.tokenize(model, next(batches)), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["bpd"].item())
    assert abs(losses[0] - 8) < 0.3  # near uniform over 256 values at initialisation
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0], (losses[:3], losses[-3:])
    rec = igpt.evaluate(model, data, cfg, run, 150)
    assert rec["unit"] == "bpd" and rec["kind"] == "exact" and rec["n_test"] == 64 and rec["test_nll"] < 2.0, rec
    assert math.isclose(rec["test_nll"], rec["bits_per_token"]) and rec["probe_acc"] > 0.8 and 0 <= rec["probe_acc_pixels"] <= 1, rec


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    f = torch.randn(300, 5, generator=g) + 4 * torch.nn.functional.one_hot(y, 5).float()
    assert igpt.linear_probe(f[:200], y[:200], f[200:], y[200:]) > 0.95


def test_bert_loss_counts_only_masked_positions():
    model, _ = tiny(objective="bert")
    x = torch.randint(0, 256, (64, model.n))
    g = torch.Generator().manual_seed(0)
    loss, m = igpt.loss_bert(model, x, 0.15, g)
    assert (m.sum(1) >= 1).all() and 0.1 < m.float().mean() < 0.25
    logits = model(torch.where(m, model.vocab, x))
    ce = torch.nn.functional.cross_entropy(logits[m], x[m])
    assert torch.allclose(loss, ce, atol=1e-6)


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "8",
            "--eval-n", "16", "--probe-n", "64", "--n-samples", "2", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "igpt.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "test_nll" in p.stdout
    for name in ("ckpt.pt", "config.json", "samples_2.png", "completions_2.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "igpt.py", "--steps", "4", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/4" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "igpt.py", "--eval", "--sample", "4", "--ckpt", str(out / "ckpt.pt"), "--data-dir", fake_fashion)
    assert p.returncode == 0 and "images/s" in p.stdout and (out / "sample.png").is_file(), p.stderr
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 4 and rec["split"] == "test" and rec["unit"] == "bpd" and rec["kind"] == "exact" and rec["n_test"] == 16
    assert rec["tokens"] == 196 and 0 < rec["test_nll"] < 9 and 0 <= rec["probe_acc"] <= 1  # 14 x 14 downsampled tokens


def test_bad_flags_stop_with_one_clear_line(fake_fashion):
    parse = lambda *argv: igpt.common.parse_config(igpt.Config, igpt.PRESETS, "igpt", list(argv))
    for argv, msg in ((["--steps", "0"], "error: --steps 0 out of range"), (["--objective", "gan"], "error: --objective 'gan' unknown"),
                      (["--dataset", "imagenet"], "error: --dataset 'imagenet' unknown")):
        with pytest.raises(SystemExit, match=msg) as e:
            parse(*argv)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="error: --downsample 3 must be >= 1 and divide the image sides"):
        igpt.prepare(parse("--data-dir", fake_fashion, "--downsample", "3"))
    with pytest.raises(SystemExit, match="error: --width 15 is not divisible by --heads 2"):
        tiny(width=15, heads=2)
    with pytest.raises(SystemExit, match="error: --sample needs a model trained with --objective ar"):
        igpt.check_sampler(tiny(objective="bert")[0])


def test_colour_run_builds_the_palette_and_reports_nats(tmp_path):
    """A tiny CIFAR-10-format folder (the official pickled batches): k-means palette in the checkpoint, NLL in nats."""
    import pickle
    import numpy as np
    root, rng = tmp_path / "cifar-10-batches-py", np.random.default_rng(0)
    root.mkdir()
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img = colours[rng.integers(0, 12, (16, 32, 32))].transpose(0, 3, 1, 2).reshape(16, -1)  # (16, 3*32*32), 12 colours
        (root / name).write_bytes(pickle.dumps({b"data": img, b"labels": list(rng.integers(0, 10, 16))}))
    out = tmp_path / "run"
    cfg = igpt.Config(dataset="cifar10", data_dir=str(tmp_path), out=str(out), ckpt=str(out / "ckpt.pt"), steps=2, layers=1, width=16,
                      heads=2, batch_size=8, eval_n=4, probe_n=16, palette=16, kmeans_pixels=4000, n_samples=2, device="cpu", log_every=1)
    model = igpt.train(cfg)
    assert model.n == 1024 and model.palette.shape == (16, 3)
    assert {tuple(c) for c in model.palette.round().long().tolist()} == {tuple(c) for c in colours.tolist()}  # 12 colours kept exactly
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["unit"] == "nats" and rec["kind"] == "exact" and rec["test_nll"] == rec["seq_nll_nats"] and rec["vocab"] == 16
    assert math.isclose(rec["bits_per_token"], rec["test_nll"] / (1024 * math.log(2))) and (out / "completions_2.png").is_file()
    ckpt = common.load_checkpoint(cfg.ckpt, ("igpt",))
    assert torch.equal(ckpt["model"]["palette"], model.palette) and ckpt["vocab"] == 16


def test_bert_evaluation_reports_no_likelihood():
    xtr, ytr = synthetic(64)
    data = common.Data("synthetic", "image", (1, 8, 8), xtr, xtr[:16], ytr, ytr[:16])
    model, cfg = tiny((1, 8, 8), 256, objective="bert", probe_n=64)
    rec = igpt.evaluate(model, data, cfg, common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True), 0)
    assert rec["test_nll"] is None and rec["kind"] is None and rec["n_test"] == 16
    assert abs(rec["masked_ce_nats"] - math.log(256)) < 0.3 and 0 <= rec["probe_acc"] <= 1  # near uniform at initialisation
