"""The ingestion stages as plain functions: what each Dagster asset (and the CLI) runs.

Each stage takes the objects it needs (vector store, storage, CLIP backend) and returns a small report
the caller turns into logs, Dagster metadata or a table. No Dagster import and no printing: the same
code runs in an asset, in ``heimdex-clip`` commands and in tests.

- :mod:`.register`: a local video file -> storage + a videos row (and the inbox folder);
- :mod:`.keyframes`: video -> scenes -> best frame each -> thumbnails -> scene rows;
- :mod:`.embed`: thumbnails -> signed URLs -> CLIP backend -> vectors in the store;
- :mod:`.backfill`: every scene without a current embedding, resumable;
- :mod:`.smoke`: the end-to-end check of the configured backend.
"""
