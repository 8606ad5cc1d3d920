import dagster as dg

from heimdex_clip_assets.adapters.db import VideoRecord

# One partition per video, keyed by the video's uuid; the new-video sensor adds them.
videos_partitions = dg.DynamicPartitionsDefinition(name="videos")


def video_labels(video: VideoRecord | None) -> dict[str, str]:
    """What a partition is, for people: the UI lists partitions by bare uuid, so runs carry these as tags
    and materializations as metadata."""
    if video is None:
        return {}
    labels = {"heimdex/file_name": video.filename, "heimdex/owner_id": video.owner_id}
    return {key: value for key, value in labels.items() if value}
