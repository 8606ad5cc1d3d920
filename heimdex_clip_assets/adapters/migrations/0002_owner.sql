-- Tenancy: each video belongs to one user (the seed system's videos.owner_id); search filters by it.
-- Nullable, so rows made before this migration stay valid; they match no user filter.
ALTER TABLE videos ADD COLUMN IF NOT EXISTS owner_id uuid;
CREATE INDEX IF NOT EXISTS videos_owner_id_idx ON videos (owner_id);
