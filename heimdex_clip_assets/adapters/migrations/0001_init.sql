-- Videos and their scenes, with one CLIP embedding per scene keyframe.
-- {dim} is the configured model's embedding width, filled in when the migration runs.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS videos (
    id uuid PRIMARY KEY,
    storage_path text NOT NULL,
    filename text,
    duration_s double precision,
    fps double precision,
    width integer,
    height integer,
    status text NOT NULL DEFAULT 'pending',
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS videos_status_idx ON videos (status);

CREATE TABLE IF NOT EXISTS video_scenes (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    video_id uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    "index" integer NOT NULL CHECK ("index" >= 0),
    start_s double precision NOT NULL,
    end_s double precision NOT NULL,
    keyframe_s double precision NOT NULL,
    thumbnail_path text NOT NULL,
    thumbnail_sha256 text NOT NULL,
    embedding_visual_clip vector({dim}),
    visual_clip_metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (video_id, "index")
);
-- The embedding cache looks scenes up by thumbnail content, across videos.
CREATE INDEX IF NOT EXISTS video_scenes_thumbnail_sha256_idx ON video_scenes (thumbnail_sha256);
-- Cosine HNSW: CLIP vectors are compared by angle. m/ef_construction are pgvector's defaults, which
-- the bench (bench/db.py) shows reach recall@10 >= 0.95 with ef_search 100.
CREATE INDEX IF NOT EXISTS video_scenes_embedding_visual_clip_hnsw_idx
    ON video_scenes USING hnsw (embedding_visual_clip vector_cosine_ops) WITH (m = 16, ef_construction = 64);
