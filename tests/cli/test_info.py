"""``s3 info`` reports versions, device and models."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from s3cli.cli.main import app


def test_info_json(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("S3_WEIGHTS", str(tmp_path))
    (tmp_path / "cutie-small-mega.pth").write_bytes(b"")
    r = CliRunner().invoke(app, ["info", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["torch"] == torch.__version__ and data["cuda"] == torch.cuda.is_available()
    assert data["models"]["cutie-small"] == str(tmp_path / "cutie-small-mega.pth")
    assert data["models"]["cutie-base"] is None
    assert data["models"]["lite"].endswith("efficientnet-lite0-57934424.pth")
