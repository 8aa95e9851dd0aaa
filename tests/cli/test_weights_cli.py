"""``s3 weights``: bad checkpoint files give one clear error line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from s3cli.cli.main import app
from s3cli.model.registry import build_network
from tests.cli.helpers import assert_one_error

runner = CliRunner()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "small.pth"
    torch.save(build_network("cutie-small", synthetic=True).state_dict(), path)
    return path


def test_check_ok(small_ckpt: Path) -> None:
    result = runner.invoke(app, ["weights", "check", str(small_ckpt)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"] == "cutie-small" and info["parameters"] > 1_000_000


def test_check_truncated(small_ckpt: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pth"
    cut.write_bytes(small_ckpt.read_bytes()[:100_000])
    assert_one_error(runner.invoke(app, ["weights", "check", str(cut)]), f"{cut}: not a readable")


def test_check_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_text("not a model")
    assert_one_error(runner.invoke(app, ["weights", "check", str(bad)]), f"{bad}: not a readable")


def test_check_wrong_model(small_ckpt: Path) -> None:
    result = runner.invoke(app, ["weights", "check", "--model", "cutie-base", str(small_ckpt)])
    assert_one_error(result, "is a cutie-small checkpoint, not cutie-base")


def test_check_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["weights", "check", str(tmp_path / "none.pth")])
    assert_one_error(result, "no such checkpoint file")


def test_list_json() -> None:
    result = runner.invoke(app, ["weights", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    mega = next(r for r in rows if r["file"] == "cutie-base-mega.pth")
    assert mega["md5"] == "a6071de6136982e396851903ab4c083a" and mega["model"] == "cutie-base"


@pytest.fixture()
def http_root(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / 'srv'``."""
    import functools
    import http.server
    import threading

    root = tmp_path / "srv"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_from_mirror(http_root, small_ckpt: Path, tmp_path: Path) -> None:
    root, url = http_root
    (root / "cutie-small-mega.pth").write_bytes(small_ckpt.read_bytes())
    dest = tmp_path / "w"
    r = runner.invoke(app, ["weights", "fetch", "cutie-small-mega", "--dest", str(dest),
                            "--mirror", url])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(dest / "cutie-small-mega.pth")
    assert (dest / "cutie-small-mega.pth").read_bytes() == small_ckpt.read_bytes()
    assert [p.name for p in dest.iterdir()] == ["cutie-small-mega.pth"]


def test_fetch_rejects_wrong_content(http_root, small_ckpt: Path, tmp_path: Path) -> None:
    root, url = http_root
    (root / "cutie-base-nomose.pth").write_bytes(small_ckpt.read_bytes())  # a small model
    (root / "cutie-base-mega.pth").write_bytes(b"x" * 1000)
    dest = tmp_path / "w"
    r = runner.invoke(app, ["weights", "fetch", "cutie-base-nomose.pth", "--dest", str(dest),
                            "--mirror", url])
    assert_one_error(r, "is a cutie-small checkpoint, not cutie-base")
    r = runner.invoke(app, ["weights", "fetch", "cutie-base-mega", "--dest", str(dest),
                            "--mirror", url])
    assert_one_error(r, "got 1000 bytes, the official cutie-base-mega.pth has 140443788")
    r = runner.invoke(app, ["weights", "fetch", "cutie-small-wmose", "--dest", str(dest),
                            "--mirror", url])
    assert_one_error(r, "download failed")
    assert list(dest.iterdir()) == []


def test_fetch_unknown_and_unpublished(tmp_path: Path) -> None:
    r = runner.invoke(app, ["weights", "fetch", "nothing", "--dest", str(tmp_path)])
    assert_one_error(r, "nothing: not a known checkpoint")
    r = runner.invoke(app, ["weights", "fetch", "s3-base.pth", "--dest", str(tmp_path)])
    assert_one_error(r, "no download address has been published")
