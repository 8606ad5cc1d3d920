"""``python -m heimdex_clip_assets.cli``: the same as the ``heimdex-clip`` command."""

from . import run

run()
