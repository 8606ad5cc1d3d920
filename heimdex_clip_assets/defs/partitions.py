import dagster as dg

# One partition per video, keyed by the video's uuid; the new-video sensor adds them.
videos_partitions = dg.DynamicPartitionsDefinition(name="videos")
