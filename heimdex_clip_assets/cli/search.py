"""``heimdex-clip search``: text or image -> the closest scenes."""

from __future__ import annotations

import argparse
from pathlib import Path

from heimdex_clip_assets import services
from heimdex_clip_assets.config import parse_user_id
from heimdex_clip_assets.pipeline.search import check_image, check_query
from heimdex_clip_contract.errors import ConfigError, NotFoundError

from .common import (
    console,
    random_weights_note,
    settings_from_args,
    thumbnail_label,
    video_id_arg,
)


def cmd_search(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if bool(args.query) == bool(args.image):
        raise ConfigError('Give a text query or --image PATH, e.g. heimdex-clip search "a red car"')
    video_id = video_id_arg(args.video_id) if args.video_id else None
    # The worker's text tower with the runpod backend (no torch here), the in-process one with local.
    encoder = services.query_encoder(settings)
    if args.image:
        image = Path(args.image)
        if not image.is_file():
            raise NotFoundError(f"No such image: {image}; check the path")
        vector = encoder.encode_image(check_image(image.read_bytes()))
    else:
        vector = encoder.encode_texts([check_query(args.query)])[0]
    user_id = parse_user_id(args.user_id, "--user-id") if args.user_id else None
    hits = services.vector_store(settings).search(
        vector, k=args.limit, video_id=video_id, user_id=user_id, model_version=settings.clip_model_version
    )
    if not hits:
        console.print("No scenes with embeddings yet; run `heimdex-clip demo` or `process-video` first.")
        return 0
    # Plain lines rather than a table: a table squeezed into 80 columns cuts ids and paths short, and
    # both are made to be copied. Each hit's first line fits 80 columns; the path follows on its own.
    note = random_weights_note(settings)
    console.print(f"search: {args.query or args.image}" + (f"  [yellow]({note})[/yellow]" if note else ""))
    console.print(f"{'score':>6}  {'scene':>5}  {'time':<15}  video", style="bold")
    for hit in hits:
        time_range = f"{hit.start_s:.2f}-{hit.end_s:.2f}s"
        console.print(f"{hit.score:6.3f}  {hit.index:5d}  {time_range:<15}  {hit.video_id}", highlight=False)
        console.print(
            f"{'':6}  {'':5}  {thumbnail_label(hit.thumbnail_url, settings.bucket)}", highlight=False
        )
    return 0
