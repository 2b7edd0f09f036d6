-- migrate:up

-- The example of seed 000 ("Postgres as a Pub/Sub service"), as it was meant
-- to work: every change to a `job` row is recorded in `notification` and
-- announced on `job_channel` as {"job_id", "notification_id", "status"}.
-- Applied by `pgpubsub migrate --example` (or `dbmate -d db/examples up`).
--
-- Fixed from the seed: its trigger compared TG_OP with ' INSERT' (a leading
-- space), so the INSERT and DELETE branches never ran. Here the comparison is
-- exact, DELETE reports the old row, and the trigger returns NULL (the return
-- value of an AFTER trigger is ignored).
--
-- This is a plain pg_notify, exactly the seed's flow: at-most-once, 8000-byte
-- limit. `pgpubsub watch job` gives the same table the lossless path.

CREATE TABLE public.job (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status     text        NOT NULL DEFAULT 'pending',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.notification (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint      NOT NULL,
    operation  text        NOT NULL,
    status     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION public.job_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_job_id          bigint;
    v_status          text;
    v_notification_id bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_job_id := OLD.id;
        v_status := OLD.status;
    ELSE
        v_job_id := NEW.id;
        v_status := NEW.status;
    END IF;

    INSERT INTO public.notification (job_id, operation, status)
    VALUES (v_job_id, TG_OP, v_status)
    RETURNING id INTO v_notification_id;

    PERFORM pg_notify('job_channel', json_build_object(
        'job_id', v_job_id,
        'notification_id', v_notification_id,
        'status', v_status)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_trigger
    AFTER INSERT OR UPDATE OR DELETE ON public.job
    FOR EACH ROW EXECUTE FUNCTION public.job_notify();

-- migrate:down

DROP TABLE public.notification;
DROP TABLE public.job;
DROP FUNCTION public.job_notify();
