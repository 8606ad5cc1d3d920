"""``heimdex-clip search``: text or image -> the closest scenes."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from heimdex_clip_assets import services
from heimdex_clip_contract.errors import ClipError, ConfigError, NotFoundError

from .common import (
    console,
    settings_from_args,
)


def cmd_search(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if bool(args.query) == bool(args.image):
        raise ConfigError('Give a text query or --image PATH, e.g. heimdex-clip search "a red car"')
    encoder = services.text_image_encoder(settings)
    if args.image:
        image = Path(args.image)
        if not image.is_file():
            raise NotFoundError(f"No such image: {image}; check the path")
        result = encoder.encode_bytes([image.read_bytes()])[0]
        if isinstance(result, ClipError):
            raise result
        vector = result
    else:
        vector = encoder.encode_text([args.query])[0]
    hits = services.vector_store(settings).search(
        vector, k=args.limit, video_id=args.video_id, model_version=settings.clip_model_version
    )
    if not hits:
        console.print("No scenes with embeddings yet; run `heimdex-clip demo` or `process-video` first.")
        return 0
    table = Table(title=f"search: {args.query or args.image}")
    for column in ("video", "scene", "time", "score", "thumbnail"):
        table.add_column(column)
    for hit in hits:
        table.add_row(
            hit.video_id,
            str(hit.index),
            f"{hit.start_s:.2f}-{hit.end_s:.2f}s",
            f"{hit.score:.3f}",
            hit.thumbnail_path,
        )
    console.print(table)
    return 0
