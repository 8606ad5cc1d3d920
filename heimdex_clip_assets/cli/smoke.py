"""``heimdex-clip smoke``: one line per check of the configured backend."""

from __future__ import annotations

import argparse

from .common import (
    console,
    random_weights_note,
    require_weights,
    settings_from_args,
)


def cmd_smoke(args: argparse.Namespace) -> int:
    from heimdex_clip_assets.pipeline.smoke import run_smoke

    settings = settings_from_args(args)
    require_weights(settings)
    checks = run_smoke(settings)
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.message}")
    note = random_weights_note(settings)
    if note and settings.clip_backend == "local":
        console.print(f"[yellow]![/yellow] {note[0].upper()}{note[1:]} (CLIP_PRETRAINED=none)")
    return 0 if all(c.ok for c in checks) else 1
