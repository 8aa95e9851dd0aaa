"""``s3 train`` end to end on the CPU: cutie-small, tiny crops, a few iterations.

- the loss falls when one fixed batch is trained on (overfit check);
- a run stopped and resumed takes exactly the steps of an uninterrupted run (same losses);
- a run on ../shared/data/davis16-mini through the CLI writes a checkpoint ``s3 segment`` reads;
- two processes under torchrun (gloo) end with identical parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.train.config import DataSpec, TrainConfig
from s3cli.train.data import SampleKey, collate
from s3cli.train.trainer import Trainer, run_training
from tests.conftest import REPO, SHARED, require_shared
from tests.train.synth import make_ytvos

runner = CliRunner()
DAVIS_MINI = SHARED / "data" / "davis16-mini"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine more threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_ytvos(tmp_path_factory.mktemp("synth"))


def tiny(data: Path, output: Path, **kw) -> TrainConfig:
    values = dict(
        model="cutie-small", data=(DataSpec("ytvos", str(data)),), output=str(output),
        crop_size=64, seq_length=3, batch_size=1, points=1024, workers=0, iterations=3,
        save_every=1000, log_every=1, tensorboard=False,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_overfit_fixed_batch(synth, tmp_path, capsys):
    cfg = tiny(synth, tmp_path / "run", lr=1e-4, merge_prob=0.0, iterations=1000)
    trainer = Trainer(cfg)
    batch = collate([trainer.make_dataset()[SampleKey(0, 0)]])
    assert int(batch["num_objects"][0]) == 2
    before = trainer.evaluate_loss(batch, seed=0)
    curve = [trainer.train_step(batch)["total_loss"] for _ in range(8)]
    after = trainer.evaluate_loss(batch, seed=0)
    with capsys.disabled():
        print(f"\noverfit: eval loss {before:.3f} -> {after:.3f}; steps "
              + " ".join(f"{v:.3f}" for v in curve))
    assert after < 0.75 * before
    assert sum(curve[-3:]) / 3 < curve[0]


def _losses(cfg: TrainConfig) -> dict[int, float]:
    seen: dict[int, float] = {}
    run_training(cfg, progress=lambda it, _n, values: seen.__setitem__(it, values["loss"]))
    return seen


def test_resume_continues_exactly(synth, tmp_path, capsys):
    straight = _losses(tiny(synth, tmp_path / "straight"))
    assert sorted(straight) == [1, 2, 3]

    out = tmp_path / "resumed"
    first = _losses(tiny(synth, out, stop_at=2))
    assert first == {1: straight[1], 2: straight[2]}  # same data and randomness
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["it"] == 2 and {"optimizer", "scheduler", "rng", "weights"} <= set(state)
    second = _losses(tiny(synth, out))
    assert sorted(second) == [3]
    with capsys.disabled():
        print(f"\nresume: uninterrupted losses {straight}; stopped {first}; resumed {second}")
    assert second[3] == straight[3]  # bit for bit

    # the CSV log has one row per iteration, the resumed run's appended
    rows = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["it", "1", "2", "3"]
    # both runs end with the same parameters
    a = json.loads((tmp_path / "straight" / "ranks.json").read_text())["param_sha256"]
    b = json.loads((out / "ranks.json").read_text())["param_sha256"]
    assert a == b


def test_davis_mini_cli_checkpoint_loads_in_segment(tmp_path):
    data = require_shared(DAVIS_MINI)
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--data", f"davis={data}", "--model", "cutie-small", "--iterations", "2",
        "--output", str(out), "--crop-size", "64", "--seq-length", "3", "--batch-size", "1",
        "--points", "512", "--workers", "0", "--log-every", "1", "--no-tensorboard",
    ])
    assert result.exit_code == 0, result.output
    assert "7 sequences" in result.stderr
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and "total_loss" in rows[0]
    ckpt = out / "checkpoint.pth"
    assert ckpt.is_file() and (out / "weights_000002.pth").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    seq = data / "JPEGImages" / "480p" / "blackswan"
    mask = data / "Annotations" / "480p" / "blackswan" / "00000.png"
    masks = tmp_path / "masks"
    result = runner.invoke(app, [
        "segment", "--weights", str(ckpt), "--size", "64", "--end", "3", str(seq), "-m",
        str(mask), "-o", str(masks),
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in masks.glob("*.png")) == ["00000.png", "00001.png",
                                                            "00002.png"]


def test_torchrun_two_processes_same_parameters(synth, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "s3cli", "train", "--data", f"ytvos={synth}", "--model", "cutie-small",
        "--iterations", "2", "--output", str(out), "--crop-size", "64", "--seq-length", "3",
        "--batch-size", "2", "--points", "512", "--workers", "0", "--device", "cpu",
        "--log-every", "1", "--no-tensorboard",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["iteration"] == 2
    assert len(ranks["param_sha256"]) == 2 and ranks["identical"]
    assert "2 process(es), batch 2 (1 per process)" in proc.stderr
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["it"] == 2
