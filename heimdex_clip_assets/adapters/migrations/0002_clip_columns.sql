-- The CLIP columns, their indexes and the two search functions, added where missing, as the seed
-- system's own CLIP migration does. {dim} is the configured model's width; a column of another width is
-- refused before this runs. Each index or function is created only when no equivalent exists, so a
-- database that already has them (under any name) is left as it is.
ALTER TABLE public.video_scenes ADD COLUMN IF NOT EXISTS embedding_visual_clip vector({dim});
ALTER TABLE public.video_scenes ADD COLUMN IF NOT EXISTS visual_clip_metadata jsonb;

DO $do$
BEGIN
    -- Cosine HNSW: CLIP vectors are compared by angle. m/ef_construction are the seed's (and pgvector's
    -- defaults), which the bench shows reach recall@10 >= 0.95 with ef_search 100.
    IF NOT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'video_scenes'
                   AND indexdef LIKE '%hnsw%embedding_visual_clip%') THEN
        CREATE INDEX video_scenes_embedding_visual_clip_hnsw_idx ON public.video_scenes
            USING hnsw (embedding_visual_clip vector_cosine_ops) WITH (m = 16, ef_construction = 64);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'video_scenes'
                   AND indexdef LIKE '%WHERE (embedding_visual_clip IS NOT NULL)%') THEN
        CREATE INDEX video_scenes_has_visual_clip_idx ON public.video_scenes (video_id)
            WHERE embedding_visual_clip IS NOT NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'video_scenes'
                   AND indexdef LIKE '%gin%visual_clip_metadata%') THEN
        CREATE INDEX video_scenes_visual_clip_metadata_idx ON public.video_scenes
            USING gin (visual_clip_metadata);
    END IF;

    -- Scenes closest to a CLIP vector; filter_user_id keeps tenants apart through videos.owner_id.
    IF NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'search_scenes_by_visual_clip_embedding') THEN
        CREATE FUNCTION public.search_scenes_by_visual_clip_embedding(
            query_embedding vector({dim}),
            match_threshold double precision DEFAULT 0.5,
            match_count integer DEFAULT 20,
            filter_video_id uuid DEFAULT NULL,
            filter_user_id uuid DEFAULT NULL
        ) RETURNS TABLE (
            id uuid, video_id uuid, "index" integer, start_s double precision, end_s double precision,
            transcript_segment text, visual_summary text, combined_text text, thumbnail_url text,
            tags text[], visual_clip_metadata jsonb, created_at timestamptz, similarity double precision
        ) LANGUAGE sql STABLE AS $fn$
            SELECT s.id, s.video_id, s."index", s.start_s, s.end_s, s.transcript_segment, s.visual_summary,
                   s.combined_text, s.thumbnail_url, s.tags, s.visual_clip_metadata, s.created_at,
                   1 - (s.embedding_visual_clip <=> query_embedding)
            FROM public.video_scenes s JOIN public.videos v ON v.id = s.video_id
            WHERE s.embedding_visual_clip IS NOT NULL
              AND (filter_video_id IS NULL OR s.video_id = filter_video_id)
              AND (filter_user_id IS NULL OR v.owner_id = filter_user_id)
              AND 1 - (s.embedding_visual_clip <=> query_embedding) >= match_threshold
            ORDER BY s.embedding_visual_clip <=> query_embedding
            LIMIT match_count
        $fn$;
    END IF;
    -- Similarity of given scenes to a vector (re-ranking another search's candidates).
    IF NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'batch_score_scenes_clip') THEN
        CREATE FUNCTION public.batch_score_scenes_clip(
            query_embedding vector({dim}), scene_ids uuid[], filter_user_id uuid DEFAULT NULL
        ) RETURNS TABLE (id uuid, similarity double precision) LANGUAGE sql STABLE AS $fn$
            SELECT s.id, 1 - (s.embedding_visual_clip <=> query_embedding)
            FROM public.video_scenes s JOIN public.videos v ON v.id = s.video_id
            WHERE s.id = ANY(scene_ids) AND s.embedding_visual_clip IS NOT NULL
              AND (filter_user_id IS NULL OR v.owner_id = filter_user_id)
        $fn$;
    END IF;
END
$do$;
