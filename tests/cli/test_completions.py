"""Shell completions: the committed scripts are current and actually complete commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from s3cli.cli.completions import SHELLS, completion_script
from tests.conftest import REPO


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_committed_scripts_are_current(shell: str) -> None:
    committed = (REPO / "completions" / SHELLS[shell]).read_text()
    assert committed == completion_script(shell), (
        f"completions/{SHELLS[shell]} is stale: run python -m s3cli.cli.completions completions"
    )


def _complete(words: str, cword: int) -> list[str]:
    env = dict(os.environ, _S3_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
    code = "from s3cli.cli.main import app; app(prog_name='s3')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.split()


def test_bash_completes_commands_and_options() -> None:
    assert "segment" in _complete("s3 seg", 1)
    assert {"score", "segment"} <= set(_complete("s3 s", 1))
    assert "--mem-every" in _complete("s3 segment --mem", 2)


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, s3cli.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
