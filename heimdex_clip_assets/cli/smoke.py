"""``heimdex-clip smoke``: one line per check of the configured backend."""

from __future__ import annotations

import argparse

from .common import (
    console,
    settings_from_args,
)


def cmd_smoke(args: argparse.Namespace) -> int:
    from heimdex_clip_assets.pipeline.smoke import run_smoke

    checks = run_smoke(settings_from_args(args))
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.message}")
    return 0 if all(c.ok for c in checks) else 1
