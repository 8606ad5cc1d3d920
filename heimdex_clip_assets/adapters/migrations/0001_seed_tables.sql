-- The seed system's tables, created only where they are missing (a fresh database). On that system's
-- own database every statement here finds its object and leaves it as it is: nothing of theirs is
-- altered. Column names, types and defaults follow that system's layout, so its app, its SQL and the
-- guide's queries run on both. The project's own bookkeeping is in schema heimdex_clip (0003).
CREATE EXTENSION IF NOT EXISTS vector;

DO $do$
BEGIN
    -- Supabase provides auth.users and auth.uid(); a plain PostgreSQL gets stand-ins, marked as ours so
    -- the project may add local owners to them (it never writes to a real auth.users).
    IF to_regclass('auth.users') IS NULL THEN
        CREATE SCHEMA IF NOT EXISTS auth;
        CREATE TABLE auth.users (id uuid PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO heimdex_clip.settings (key, value) VALUES ('local_auth_users', 'true');
    END IF;
    IF to_regprocedure('auth.uid()') IS NULL THEN
        CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
            AS $fn$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $fn$;
    END IF;
    IF to_regtype('public.video_status') IS NULL THEN
        CREATE TYPE public.video_status AS ENUM ('PENDING', 'PROCESSING', 'READY', 'FAILED');
    END IF;

    IF to_regclass('public.videos') IS NULL THEN
        CREATE TABLE public.videos (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            owner_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
            storage_path text NOT NULL,
            status public.video_status NOT NULL DEFAULT 'PENDING',
            duration_s double precision,
            frame_rate double precision,
            width integer,
            height integer,
            video_created_at timestamptz,
            thumbnail_url text,
            error_message text,
            filename text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX videos_owner_id_idx ON public.videos (owner_id);
        CREATE INDEX videos_status_idx ON public.videos (status);
        ALTER TABLE public.videos ENABLE ROW LEVEL SECURITY;
        CREATE POLICY videos_owner_all ON public.videos
            USING (owner_id = auth.uid()) WITH CHECK (owner_id = auth.uid());
        CREATE FUNCTION public.heimdex_touch_updated_at() RETURNS trigger LANGUAGE plpgsql
            AS $fn$ BEGIN NEW.updated_at := now(); RETURN NEW; END $fn$;
        CREATE TRIGGER videos_touch_updated_at BEFORE UPDATE ON public.videos
            FOR EACH ROW EXECUTE FUNCTION public.heimdex_touch_updated_at();
    END IF;

    IF to_regclass('public.video_scenes') IS NULL THEN
        CREATE TABLE public.video_scenes (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            video_id uuid NOT NULL REFERENCES public.videos (id) ON DELETE CASCADE,
            "index" integer NOT NULL,
            start_s double precision NOT NULL,
            end_s double precision NOT NULL,
            transcript_segment text,
            visual_summary text,
            combined_text text,
            thumbnail_url text,
            embedding vector(1536),
            visual_description text,
            visual_entities text[],
            visual_actions text[],
            tags text[],
            sidecar_version text,
            search_text text,
            embedding_metadata jsonb,
            needs_reprocess boolean DEFAULT false,
            processing_stats jsonb,
            embedding_transcript vector(1536),
            embedding_visual vector(1536),
            embedding_summary vector(1536),
            embedding_version text,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (video_id, "index")
        );
        ALTER TABLE public.video_scenes ENABLE ROW LEVEL SECURITY;
        CREATE POLICY video_scenes_owner_all ON public.video_scenes
            USING (EXISTS (SELECT 1 FROM public.videos v WHERE v.id = video_id AND v.owner_id = auth.uid()));
    END IF;
END
$do$;
