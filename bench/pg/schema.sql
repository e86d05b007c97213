-- Table for the engage benchmark's PostgreSQL baseline. Loaded with COPY from the CSV the engage
-- side generates (header: event_id,user_id,name,occurred_at,attributes).
CREATE TABLE events (
    event_id    text        PRIMARY KEY,
    user_id     text        NOT NULL,
    name        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    attributes  jsonb       NOT NULL
);
