-- The project's own bookkeeping, beside the seed's tables and never in them: which videos it
-- registered (only those does it give a videos.status), its progress per video, and per scene the
-- thumbnail's content hash (the embedding cache's key) and the keyframe's time.
CREATE TABLE IF NOT EXISTS heimdex_clip.videos (
    video_id uuid PRIMARY KEY REFERENCES public.videos (id) ON DELETE CASCADE,
    registered boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'registered',
    error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS heimdex_clip.scenes (
    scene_id uuid PRIMARY KEY REFERENCES public.video_scenes (id) ON DELETE CASCADE,
    video_id uuid NOT NULL REFERENCES public.videos (id) ON DELETE CASCADE,
    keyframe_s double precision NOT NULL,
    thumbnail_sha256 text NOT NULL
);
-- The embedding cache looks scenes up by thumbnail content, across videos.
CREATE INDEX IF NOT EXISTS scenes_thumbnail_sha256_idx ON heimdex_clip.scenes (thumbnail_sha256);

-- Nobody but the project's role (and superusers) reads its bookkeeping through Supabase's API.
ALTER TABLE heimdex_clip.videos ENABLE ROW LEVEL SECURITY;
ALTER TABLE heimdex_clip.scenes ENABLE ROW LEVEL SECURITY;
