"""common.py: config precedence and errors, every data set, checkpoints, resume, the guarded update,
logging, EMA, bits/dim, and a 2-process DDP run."""
import argparse
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import common
from conftest import PYTHON, run_script, write_mnist_like


@dataclass
class Cfg(common.TrainConfig):
    width: int = 8  # a method-specific field, for the help text test
    arch: str = common.choice("mlp", "conv")  # network kind


PRESETS = {"fashion-mnist": dict(steps=7, lr=0.5, binarize=True), "mnist": dict(steps=3), "toy": dict(width=2)}


def parse(*argv):
    return common.parse_config(Cfg, PRESETS, "m", argv=list(argv))


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    return str(e.value.code)


# ----------------------------------------------------------------------------- config
def test_preset_then_flags():
    cfg = parse()
    assert (cfg.dataset, cfg.steps, cfg.lr, cfg.binarize, cfg.width) == ("fashion-mnist", 7, 0.5, True, 8)
    assert cfg.out == os.path.join("runs", "m", "fashion-mnist") and cfg.ckpt == os.path.join(cfg.out, "ckpt.pt")
    cfg = parse("--steps", "9", "--no-binarize", "--arch", "conv")
    assert (cfg.steps, cfg.lr, cfg.binarize, cfg.arch) == (9, 0.5, False, "conv")  # flags beat the preset
    assert parse("--dataset", "mnist").steps == 3 and parse("--dataset", "mnist").lr == 1e-3  # mnist preset only
    assert parse("--dataset", "moons").width == 2  # a toy density without its own preset takes "toy"
    assert parse("--dataset", "moons", "--width", "5").width == 5
    own = common.parse_config(Cfg, {"u1": dict(steps=4)}, "m", argv=["--dataset", "u1"], own_sets=("u1", "u2"))
    assert own.dataset == "u1" and own.steps == 4 and own.out == os.path.join("runs", "m", "u1")  # a file's own data set
    assert "u2" not in error_of("--dataset", "u1")  # only for the file that makes it


def test_help_text_comes_from_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert "a method-specific field, for the help text test" in out and "global batch, split across DDP ranks" in out
    assert "mlp|conv" in out


def test_errors_are_one_clear_line(tmp_path):
    msg = error_of("--dataset", "imagenet")
    assert "unknown" in msg and "fashion-mnist" in msg and "2spirals" in msg and "folder:PATH" in msg and "\n" not in msg
    assert "out of range" in error_of("--steps", "0") and ">= 1" in error_of("--steps", "-5")
    assert "--lr" in error_of("--lr", "-1")
    assert "accepted: auto, cpu, cuda, mps" in error_of("--device", "tpu")
    assert "accepted: mlp, conv" in error_of("--arch", "rnn")
    assert "no checkpoint at" in error_of("--eval", "--ckpt", str(tmp_path / "missing.pt"))
    assert "no such folder" in error_of("--dataset", f"folder:{tmp_path}/nope")


def test_eval_takes_config_from_checkpoint(tmp_path):
    cfg = parse("--out", str(tmp_path), "--width", "3", "--steps", "11")
    run = common.setup(cfg, "m", train=False)
    common.save_checkpoint(cfg, run, "m", 11, model=nn.Linear(2, 2))
    again = parse("--eval", "--ckpt", cfg.ckpt, "--eval-n", "5")
    assert (again.width, again.steps, again.eval_n, again.eval) == (3, 11, 5, True)


# ----------------------------------------------------------------------------- data
def data_cfg(**kw):
    cfg = Cfg(**kw)
    cfg.out = cfg.out or "/tmp/unused"
    return cfg


def cpu_run(rank=0, world=1, out="/tmp/unused"):
    return common.Run(torch.device("cpu"), None, rank, world, Path(out), rank == 0, True)


def check_images(data, shape, n_train=None):
    assert data.kind == "image" and data.shape == shape
    assert data.train.dtype == torch.uint8 and data.test.dtype == torch.uint8
    assert data.train.shape[1:] == shape and data.test.shape[1:] == shape
    if n_train:
        assert len(data.train) == n_train


def test_fashion_mnist(tmp_path, fake_fashion):
    real = os.path.isfile(f"{common.DEBIAN_FASHION}/train-images-idx3-ubyte.gz")
    cfg = data_cfg(dataset="fashion-mnist", data_dir=str(tmp_path) if real else fake_fashion, batch_size=32)
    data = common.load_data(cfg)
    check_images(data, (1, 28, 28), 60000 if real else 512)
    assert len(data.test) == (10000 if real else 128) and data.train_labels.max() == 9
    x = next(common.Batches(data, cfg, cpu_run()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x * 255, (x * 255).round())  # exactly k / 255: the 8-bit values survive
    same, other = next(common.Batches(data, cfg, cpu_run())), next(common.Batches(data, data_cfg(**{**vars(cfg), "seed": 1}), cpu_run()))
    assert torch.equal(x, same) and not torch.equal(x, other)  # determined by the seed
    cfg.binarize = True
    xb = next(common.Batches(data, cfg, cpu_run()))
    assert set(xb.unique().tolist()) <= {0.0, 1.0}
    t1, t2 = (next(common.test_batches(data, cfg, "cpu", 64)) for _ in range(2))
    assert torch.equal(t1, t2)  # a fixed binarization of the test set


def test_epochs_and_ddp_shards(fake_fashion):
    cfg = data_cfg(dataset="fashion-mnist", data_dir=fake_fashion, batch_size=64)
    data = common.load_data(cfg)
    b = common.Batches(data, cfg, cpu_run(), labels=True)
    x, y = next(b)
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and y.dtype == torch.long
    assert torch.equal(b.idx.sort().values, torch.arange(512))  # an epoch shows every image once
    for _ in range(7):  # 8 batches of 64 = one epoch
        next(b)
    assert b.epoch == 0
    next(b)
    assert b.epoch == 1 and b.pos == 64
    s0, s1 = (common.Batches(data, cfg, cpu_run(r, 2)) for r in (0, 1))  # two DDP ranks, global batch 64
    assert next(s0).shape[0] == 32 and next(s1).shape[0] == 32
    i0, i1 = set(s0.idx.tolist()), set(s1.idx.tolist())
    assert len(i0) == len(i1) == 256 and not i0 & i1  # disjoint shards


def test_mnist_cifar_folder(tmp_path):
    write_mnist_like(str(tmp_path / "MNIST" / "raw"), 100, 20, gz=False)  # torchvision's layout, uncompressed
    check_images(common.load_data(data_cfg(dataset="mnist", data_dir=str(tmp_path))), (1, 28, 28), 100)
    root = tmp_path / "cifar-10-batches-py"  # the official python-pickle archive layout
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (root / name).write_bytes(pickle.dumps(batch))
    data = common.load_data(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    check_images(data, (3, 32, 32), 50)
    assert torch.equal(data.test.reshape(10, -1), torch.from_numpy(pickle.loads((root / "test_batch").read_bytes())[b"data"]))
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(40):  # non-square images: resized then center-cropped
        torchvision.utils.save_image(torch.rand(3, 30, 50), str(folder / f"{i}.png"))
    data = common.load_data(data_cfg(dataset=f"folder:{tmp_path / 'imgs'}", image_size=16))
    check_images(data, (3, 16, 16), 38)
    assert len(data.test) == 2
    with pytest.raises(SystemExit, match="needs at least 2"):
        common.load_data(data_cfg(dataset=f"folder:{tmp_path / 'MNIST'}"))


def test_toy_densities():
    for name in common.TOY_SETS:
        x = common.toy_sample(name, 4000, torch.Generator().manual_seed(0))
        assert x.shape == (4000, 2) and torch.isfinite(x).all() and x.std(0).min() > 0.3, name
        assert torch.equal(x, common.toy_sample(name, 4000, torch.Generator().manual_seed(0)))
        assert not torch.equal(x, common.toy_sample(name, 4000, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(0)
    x = common.toy_sample("checkerboard", 4000, g) / 2  # dark squares only: floor(x) + floor(y) even
    assert ((torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2 == 0).all() and x.abs().max() <= 2
    x = common.toy_sample("8gaussians", 4000, g) * 1.414
    centres = 4 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1)
    nearest = torch.cdist(x, centres).min(1).values
    assert nearest.mean() < 0.7 and torch.bincount(torch.cdist(x, centres).argmin(1), minlength=8).min() > 350
    radius = common.toy_sample("circles", 4000, g).norm(dim=1)
    assert ((radius - 3).abs().minimum((radius - 1.5).abs()) < 1.0).float().mean() > 0.999  # noise std 0.24
    data = common.load_data(data_cfg(dataset="moons", eval_n=500))
    b = common.Batches(data, data_cfg(dataset="moons", batch_size=16), cpu_run())
    assert data.kind == "toy" and data.test.shape == (500, 2) and not torch.equal(next(b), next(b))


def test_moving_digits(tmp_path):
    d, size, frames = 10, 32, 12
    squares = torch.full((5, 1, d, d), 255, dtype=torch.uint8)  # solid digits: every lit pixel is visible
    v = common.moving_digits(squares, 50, frames, size, torch.Generator().manual_seed(0))
    assert v.shape == (50, frames, 1, size, size) and v.dtype == torch.uint8
    lit = (v > 0).flatten(2).sum(2)
    assert (lit >= d * d).all() and (lit <= 2 * d * d).all()  # both digits stay inside the frame
    ys = torch.arange(size).float()
    row_of_first = [(f.squeeze(0) > 0).float().argmax(0) for f in v[0]]  # it moves
    assert len({tuple(r.tolist()) for r in row_of_first}) > 1
    com = (v.float().squeeze(2).sum(3) * ys).sum(2) / v.float().squeeze(2).sum(3).sum(2)  # (n, T) centre of mass rows
    assert (com[:, 1:] - com[:, :-1]).abs().max() <= 2 * 0.1 * (size - d) + 1  # speed 0.1 of the free range
    write_mnist_like(str(tmp_path), 50, 20)
    cfg = data_cfg(dataset="moving-mnist", data_dir=str(tmp_path), frames=5, frame_size=40, eval_n=7, batch_size=4)
    data = common.load_data(cfg)
    assert data.kind == "video" and data.shape == (5, 1, 40, 40) and data.test.shape == (7, 5, 1, 40, 40)
    assert next(common.Batches(data, cfg, cpu_run())).shape == (4, 5, 1, 40, 40)


# ----------------------------------------------------------------------------- checkpoints
def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = data_cfg(out=str(tmp_path), ckpt=str(tmp_path / "ckpt.pt"))
    run, model = cpu_run(out=str(tmp_path)), nn.Linear(3, 3)
    common.save_checkpoint(cfg, run, "m", 1, model=model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight += 1

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(cfg, run, "m", 2, model=model)
    monkeypatch.undo()
    ckpt = common.load_checkpoint(cfg.ckpt, ("m",))
    assert ckpt["step"] == 1 and all(torch.equal(before[k], ckpt["model"][k]) for k in before)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_refuses_pickles_other_methods_and_shapes(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"method": "m", "args": argparse.Namespace(x=1)}, path)  # a pickled object
    with pytest.raises(SystemExit, match=r"pickled object \(argparse.Namespace\).*refused"):
        common.load_checkpoint(path, ("m",))
    torch.save({"method": "ddpm", "step": 1}, path)
    with pytest.raises(SystemExit, match="checkpoint of 'ddpm'; accepted: vae"):
        common.load_checkpoint(path, ("vae",))
    assert common.load_checkpoint(path, ("ddim", "ddpm"))["step"] == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        common.load_checkpoint(str(tmp_path / "junk.pt"), ("m",))
    with pytest.raises(SystemExit, match=r"1 tensors differ, e.g. weight: checkpoint \(3, 2\) vs model \(3, 4\)"):
        common.load_model_state(nn.Linear(4, 3), nn.Linear(2, 3).state_dict(), path)
    with pytest.raises(SystemExit, match="4 tensors differ, e.g. weight: checkpoint missing"):  # 0.weight vs weight
        common.load_model_state(nn.Linear(2, 3), nn.Sequential(nn.Linear(2, 3)).state_dict(), path)


def tiny_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 16))


def tiny_training(cfg, run, steps):
    """A small noisy regression through Batches, Update (fused Adam) and resume; checkpoint at step 3."""
    torch.manual_seed(0)
    data = common.Data("toy", "image", (1, 4, 4), torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8), torch.zeros(1, 1, 4, 4))
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    update, batches = common.Update(opt, model.parameters(), run), common.Batches(data, cfg, run)
    start = common.resume(cfg, run, "m", model, optimizer=opt, batches=batches, update=update)
    for step in range(start, steps):
        x = next(batches)
        loss = (model(x + 0.1 * torch.randn_like(x)) - x.flatten(1)).pow(2).mean()  # needs the RNG restored too
        opt.zero_grad()
        update(loss)
        if step + 1 == 3:
            common.save_checkpoint(cfg, run, "m", step + 1, model=model, optimizer=opt, batches=batches, update=update)
    return model, start


def test_resume_continues_the_same_run(tmp_path):
    cfg = data_cfg(out=str(tmp_path), ckpt=str(tmp_path / "ckpt.pt"), batch_size=16, seed=3)
    run = cpu_run(out=str(tmp_path))
    straight, _ = tiny_training(cfg, run, 8)  # 8 steps in one go; 2 batches per epoch, so it crosses epochs
    saved = common.load_checkpoint(cfg.ckpt, ("m",))
    assert saved["step"] == 3 and (saved["batches"]["epoch"], saved["batches"]["pos"]) == (1, 16)
    cfg.resume = True
    resumed, start = tiny_training(cfg, run, 8)  # 3 steps from the checkpoint, then 5 more
    assert start == 3
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # the same trajectory: weights, Adam moments, data position and RNG restored
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    common.resume(cfg, run, "m", model, optimizer=opt)
    for k, state in opt.state_dict()["state"].items():
        assert all(torch.equal(state[n], saved["optimizer"]["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))


# ----------------------------------------------------------------------------- update, EMA, logging, metrics
@pytest.mark.parametrize("fused", [True, False])
def test_update_skips_non_finite_steps(fused):
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
    update = common.Update(opt, model.parameters(), cpu_run(), clip=1.0, patience=3)
    x = torch.ones(2, 3)
    before = [p.clone() for p in model.parameters()]
    update(model(x).sum() * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and update.skipped.item() == 1
    if fused:
        assert all(s["step"].item() == 0 for s in opt.state.values())  # not counted as an Adam step
    opt.zero_grad()
    norm = update(model(x).sum())
    assert not torch.equal(before[0], model.weight) and update.streak.item() == 0 and norm > 1  # clipped to 1
    for _ in range(3):
        opt.zero_grad()
        update(model(x).sum() * float("inf"))
    with pytest.raises(SystemExit, match="3 non-finite losses in a row"):
        update.check(update.streak.item())
    opt.zero_grad(set_to_none=True)
    update(torch.tensor(float("nan")))  # a NaN without a graph (ffjord.py's failed solve): skipped, no backward error
    assert update.streak.item() == 4
    with pytest.raises(RuntimeError, match="does not require grad"):  # a finite loss without a graph is a bug: it says so
        update(torch.tensor(1.0))


def test_ema_is_the_exponential_average_with_a_decay_warm_up():
    model = nn.Linear(2, 2)
    for warmup, t, d in ((False, 1, 0.9), (True, 1000, 0.9), (True, 1, 2 / 11), (True, 8, 0.5)):  # d = min(0.9, (1+t)/(10+t))
        ema = common.EMA(model, 0.9, warmup)
        old = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, t)
        assert torch.allclose(ema.model.weight, d * old + (1 - d) * model.weight) and not ema.model.weight.requires_grad
    for warmup, expected in ((True, math.prod((1 + t) / (10 + t) for t in range(1, 101))), (False, 0.999 ** 100)):
        ema = common.EMA(model, 0.999, warmup)
        with torch.no_grad():
            model.weight.add_(1.0)  # the weights move by 1 after the average was made
        for t in range(1, 101):
            ema.update(model, t)
        left = (model.weight - ema.model.weight).abs().max().item()  # the initial weights' share left in the average
        assert left == pytest.approx(expected, abs=1e-6, rel=1e-4), (warmup, left)  # warm-up: 2e-12 after 100 steps; without: 0.905


def test_logger_lines_and_records(tmp_path, capsys):
    cfg = data_cfg(steps=4, log_every=2, out=str(tmp_path))
    run = cpu_run(out=str(tmp_path))
    log = common.Logger(cfg, run, 0)
    for step, v in enumerate([1.0, float("nan"), 3.0, 5.0], 1):
        log(step, {"loss": torch.tensor(v), "bpd": torch.tensor(2 * v)})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step")]
    assert re.fullmatch(r"step 2/4 \| loss 1 \| bpd 2 \| [\d.]+ it/s \| eta \d+m", lines[0])  # the NaN step is left out
    assert lines[1].startswith("step 4/4 | loss 4 | bpd 8 |")
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[1]["loss"] == 4.0 and records[1]["split"] == "train"
    rec = common.eval_record(4, 3.25, "bpd", "bound", 100, k=1)
    assert list(rec) == ["step", "split", "test_nll", "unit", "kind", "n_test", "k"]


def test_bits_per_dim_known_answers():
    D = 784
    assert common.dequantized_bpd(0.0, D) == pytest.approx(8.0, abs=1e-12)  # uniform density on [0,1]^D: 8 bits
    assert common.bits_per_dim(D * math.log(256), D) == pytest.approx(8.0, abs=1e-12)  # uniform over 256 values
    # dequantized uniform data under N(1/2, s^2) per dimension: E[-log p] = 1/2 log(2 pi s^2) + (1/12) / (2 s^2)
    s, u = 0.3, torch.rand(20000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    log_p = torch.distributions.Normal(0.5, s).log_prob(u).sum(1)
    closed = (0.5 * math.log(2 * math.pi * s * s) + 1 / 24 / s ** 2 + math.log(256)) / math.log(2)
    assert common.dequantized_bpd(log_p, 16).mean().item() == pytest.approx(closed, abs=2e-3)


# ----------------------------------------------------------------------------- DDP
def test_torchrun_two_processes_stay_in_sync(tmp_path, fake_fashion):
    out = tmp_path / "ddp"
    p = run_script(PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "vae.py",
                   "--data-dir", fake_fashion, "--out", str(out), "--device", "cpu", "--steps", "6", "--batch-size", "16",
                   "--hidden", "32", "--latent", "4", "--log-every", "3", "--eval-n", "16", "--eval-k", "4")
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"ddp: max parameter difference across 2 ranks = (\S+)", p.stdout)
    assert m and float(m.group(1)) == 0.0, p.stdout
    assert p.stdout.count("step 6/6") == 1  # only rank 0 logs
    assert common.load_checkpoint(str(out / "ckpt.pt"), ("vae",))["step"] == 6


# ----------------------------------------------------------------------------- bad inputs and faults
def test_non_finite_flags_and_missing_explicit_resume_checkpoint(tmp_path):
    for flag in ("--lr", "--diverge"):
        for v in ("inf", "nan", "-inf"):
            msg = error_of(f"{flag}={v}")
            assert flag in msg and "not a finite number" in msg and "\n" not in msg, msg
    missing = tmp_path / "nowhere" / "ckpt.pt"
    msg = error_of("--resume", "--ckpt", str(missing))
    assert "--resume --ckpt" in msg and "no such checkpoint" in msg and not (tmp_path / "nowhere").exists()
    assert parse("--resume", "--out", str(tmp_path / "fresh")).resume  # the default <out>/ckpt.pt may be absent


def test_help_shows_what_runs_for_the_data_set(capsys):
    for argv, steps in ((["--help"], "[7, from the fashion-mnist preset; default 10000]"),
                        (["--dataset", "mnist", "--help"], "[3, from the mnist preset; default 10000]")):
        with pytest.raises(SystemExit):
            parse(*argv)
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert steps in out and "global batch, split across DDP ranks [128]" in out, out
    with pytest.raises(SystemExit):
        parse("--dataset", "moons", "--help")
    assert "[2, from the toy preset; default 8]" in " ".join(capsys.readouterr().out.split())


def test_nan_weights_are_never_saved(tmp_path):
    cfg = data_cfg(out=str(tmp_path), ckpt=str(tmp_path / "ckpt.pt"))
    run, model = cpu_run(out=str(tmp_path)), nn.Linear(3, 3)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match=r"step 1: model.weight is not finite; not saved, .* was never written"):
        common.save_checkpoint(cfg, run, "m", 1, model=model)
    assert not os.path.exists(cfg.ckpt)
    good = nn.Linear(3, 3)
    common.save_checkpoint(cfg, run, "m", 2, model=good)
    bn = nn.BatchNorm1d(3)
    bn.running_var.fill_(float("inf"))
    with pytest.raises(SystemExit, match="step 3: model.running_var is not finite; .* keeps the last good checkpoint"):
        common.save_checkpoint(cfg, run, "m", 3, model=bn)
    opt = torch.optim.Adam(good.parameters())
    opt.state[good.weight] = {"exp_avg": torch.full((3, 3), float("nan"))}
    with pytest.raises(SystemExit, match="optimizer.state.0.exp_avg is not finite"):
        common.save_checkpoint(cfg, run, "m", 4, model=good, optimizer=opt)
    assert common.load_checkpoint(cfg.ckpt, ("m",))["step"] == 2


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_step_leaves_buffers_as_they_were(fused):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
    update = common.Update(opt, model, cpu_run())
    x = torch.randn(8, 3)
    update(model(x).sum())  # a good step moves the running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before["1.num_batches_tracked"] == 1
    opt.zero_grad()
    update(model(torch.cat([x[:7], torch.full((1, 3), float("nan"))])).sum())  # the forward pass made them NaN
    assert update.skipped.item() == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and buffers as they were
    with torch.no_grad():  # a finite loss whose forward pass left a non-finite buffer is skipped too
        model[1].momentum = 1.0
    opt.zero_grad()
    huge = x * 1e30
    loss = model(huge).sum()
    assert torch.isfinite(loss) and not torch.isfinite(model[1].running_var).all()
    update(loss)
    assert update.skipped.item() == 2 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_logger_shows_skipped_windows_as_nan_and_warns_of_divergence(tmp_path, capsys):
    cfg = data_cfg(steps=300, log_every=2, out=str(tmp_path))
    run = cpu_run(out=str(tmp_path))
    model = nn.Linear(1, 1)
    update = common.Update(torch.optim.SGD(model.parameters(), lr=1e-9), model, run, diverge=10.0)
    log = common.Logger(cfg, run, 0, update)
    for step, v in enumerate([2.0, 2.0, float("nan"), float("nan")], 1):  # the second window is all skipped steps
        update((model.weight * 0).sum() + v)
        log(step, {"loss": torch.tensor(v)})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step")]
    assert lines[1].startswith("step 4/300 | loss nan | skipped 2 |"), lines  # never "loss 0"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss"] is None  # valid JSON
    with pytest.raises(SystemExit, match=r"loss stayed above 32 = L_1 \+ 10 \(\|L_1\| \+ 1\), L_1 = 2 the first loss, for 100 steps: diverged"):
        for step in range(5, 300):  # finite but far above the start: 1e7, as ffjord.py at --lr 1e6
            update((model.weight * 0).sum() + 1e7)
            log(step, {"loss": torch.tensor(1e7)})
    assert step == 102  # 2 skipped + 98 high steps in a row
    assert "diverging? loss above 32 (or skipped) for 10 steps" in capsys.readouterr().out
    never = common.Update(torch.optim.SGD(model.parameters(), lr=1e-9), model, run, diverge=0.0)
    for _ in range(200):
        never((model.weight * 0).sum() + 1e7)
    never.check(never.streak.item(), never.high.item())  # --diverge 0: no stop


def test_unwritable_output_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "run"):  # --out names a file, or a folder under one
        with pytest.raises(SystemExit) as e:
            common.setup(parse("--out", str(out), "--device", "cpu"), "m")
        assert str(e.value.code).startswith(f"error: could not write {out}/config.json: ") and "\n" not in str(e.value.code)
    cfg = parse("--out", str(tmp_path / "run"), "--device", "cpu")
    run = common.setup(cfg, "m")
    common.save_checkpoint(cfg, run, "m", 1, model=nn.Linear(2, 2))
    os.symlink("/dev/full", cfg.ckpt + ".tmp")  # the next write lands on a full disk
    with pytest.raises(SystemExit) as e:
        common.save_checkpoint(cfg, run, "m", 2, model=nn.Linear(2, 2))
    assert str(e.value.code).startswith(f"error: could not write {cfg.ckpt}: ") and "\n" not in str(e.value.code), e.value.code
    assert common.load_checkpoint(cfg.ckpt, ("m",))["step"] == 1 and not os.path.lexists(cfg.ckpt + ".tmp")
    with pytest.raises(SystemExit, match="could not write .*a_file/x.png"):
        common.save_grid(torch.rand(4, 1, 8, 8), tmp_path / "a_file" / "x.png")


def test_cifar_batches_cannot_run_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng, marker = np.random.default_rng(0), tmp_path / "pwned"
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(np.arange(10) if i % 3 else range(10)),
                 b"filenames": [b"f.png"] * 10}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2 if i % 2 else 4))  # the archive's protocol 2, and 4
    data = common.load_data(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    assert data.train.shape == (50, 3, 32, 32) and torch.equal(data.train_labels, torch.arange(10).repeat(5))

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(SystemExit) as e:
        common.load_data(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    msg = str(e.value.code)
    assert not marker.exists() and "data_batch_3: not a CIFAR-10 batch" in msg and "system" in msg and "\n" not in msg, msg
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((10, 3072)), b"labels": list(range(10))}))  # float64
    with pytest.raises(SystemExit, match="data_batch_3: not a CIFAR-10 batch .data must be uint8"):
        common.load_data(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))


def test_corrupt_image_is_skipped_and_named(tmp_path, capsys):
    for i in range(5):
        torchvision.utils.save_image(torch.rand(3, 20, 20), str(tmp_path / f"{i}.png"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    data = common.load_data(data_cfg(dataset=f"folder:{tmp_path}", image_size=8))
    assert len(data.train) + len(data.test) == 5
    assert f"skipped 1 unreadable file(s) of 6, e.g. {tmp_path / 'broken.jpg'} (UnidentifiedImageError)" in capsys.readouterr().out


def test_batch_size_beyond_memory_is_refused():
    data = common.load_data(data_cfg(dataset="moons", eval_n=10))
    with pytest.raises(SystemExit, match="--batch-size 10000000 is too large for toy data; accepted: at most 100000 points"):
        common.Batches(data, data_cfg(dataset="moons", batch_size=10 ** 7), cpu_run())
    with pytest.raises(SystemExit, match="--eval-n 100000000: a toy test set holds at most 1000000 points"):
        common.load_data(data_cfg(dataset="moons", eval_n=10 ** 8))
    video = common.Data("moving-mnist", "video", (20, 1, 64, 64), torch.zeros(5, 1, 28, 28, dtype=torch.uint8), None)
    with pytest.raises(SystemExit, match="accepted: at most 6553 videos"):
        common.Batches(video, data_cfg(dataset="moving-mnist", batch_size=10 ** 5), cpu_run())


def test_failed_download_leaves_nothing_behind(tmp_path):
    class Offline:  # what torchvision's MNIST does without a network: makes root/MNIST/raw, writes part of a file, raises
        __name__ = "MNIST"
        def __init__(self, root, download):
            os.makedirs(f"{root}/MNIST/raw", exist_ok=True)
            Path(f"{root}/MNIST/raw/train-images-idx3-ubyte.gz").write_bytes(b"partial")
            raise OSError("[Errno -3] Temporary failure in name resolution")

    Offline.__name__ = "MNIST"
    for keep in (False, True):
        root = tmp_path / ("kept" if keep else "new") / "data"
        if keep:  # a data dir the user already had: only what the download added goes
            (root / "MNIST").mkdir(parents=True)
            (root / "MNIST" / "notes.txt").write_text("mine")
        with pytest.raises(SystemExit, match="the download failed"):
            common._download(Offline, str(root), "mnist: no files", "--data-dir DIR")
        assert (sorted(p.name for p in root.rglob("*")) == ["MNIST", "notes.txt"]) if keep else not root.parent.exists()  # new/ too


def test_evaluation_and_fd_training_announce_themselves(fake_fashion, capsys):
    cfg = data_cfg(dataset="fashion-mnist", data_dir=fake_fashion, eval_n=50)
    data = common.load_data(cfg)
    assert sum(len(x) for x in common.test_batches(data, cfg, "cpu", 20, "importance-sampled NLL (k = 5)")) == 50
    assert capsys.readouterr().out == "evaluate: importance-sampled NLL (k = 5): 50 test examples\n"
    next(common.test_batches(data, cfg, "cpu", 20))  # no label (a fixed batch for figures): silent
    assert capsys.readouterr().out == ""
    assert list(common.progress([5, 6, 7], "FD: training", every=0)) == [5, 6, 7]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "FD: training" and re.fullmatch(r"FD: training: 2/3 batches, \d+s, about \d+s left", lines[2]) and len(lines) == 3


def test_resume_says_when_steps_changed(tmp_path, capsys):
    cfg = data_cfg(out=str(tmp_path), ckpt=str(tmp_path / "ckpt.pt"), steps=10)
    run, model = cpu_run(out=str(tmp_path)), nn.Linear(2, 2)
    common.save_checkpoint(cfg, run, "m", 10, model=model)
    cfg.resume, cfg.steps = True, 20
    assert common.resume(cfg, run, "m", model) == 10
    assert "--steps 20 differs from the checkpoint run's 10" in capsys.readouterr().out


def signalled_run(tmp_path, fake_fashion, signals, steps=100000):
    """vae.py (tiny) until its first log line, then the given signals; returns (process, stdout, stderr)."""
    import signal, subprocess, time
    out = tmp_path / "run"
    args = [PYTHON, "vae.py", "--data-dir", fake_fashion, "--out", str(out), "--device", "cpu", "--hidden", "16", "--latent", "2",
            "--batch-size", "8", "--log-every", "1", "--eval-n", "8", "--eval-k", "2", "--steps", str(steps)]
    p = subprocess.Popen(args, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    while not any(ln.startswith("step 3/") for ln in lines):
        lines.append(p.stdout.readline())
        assert lines[-1], "".join(lines) + p.stderr.read()
    for s in signals:
        p.send_signal(s)
        time.sleep(0.01)
    stdout, stderr = p.communicate(timeout=60)
    return p, "".join(lines) + stdout, stderr, out


def test_signals_stop_with_a_checkpoint_and_the_conventional_status(tmp_path, fake_fashion):
    import signal
    p, out, err, run = signalled_run(tmp_path / "int", fake_fashion, [signal.SIGINT])
    m = re.search(r"stopped at step (\d+): checkpoint (\S+); continue with --resume", out)
    assert p.returncode == 130 and m and "Traceback" not in err, out + err
    assert common.load_checkpoint(m.group(2), ("vae",))["step"] == int(m.group(1)) >= 3
    p, out, err, _ = signalled_run(tmp_path / "term", fake_fashion, [signal.SIGTERM])
    assert p.returncode == 143 and "stopped at step" in out and "Traceback" not in err, out + err
    p, out, err, _ = signalled_run(tmp_path / "twice", fake_fashion, [signal.SIGINT, signal.SIGINT])
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, out + err
