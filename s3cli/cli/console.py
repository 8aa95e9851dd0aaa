"""The stderr console shared by every command; stdout stays for machine-readable results."""

from __future__ import annotations

from rich.console import Console

__all__ = ["err_console", "error_line"]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """Print one error line on stderr."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, emoji=False)
