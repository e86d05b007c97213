-- Secondary indexes, built after the load (as anyone bulk-loading PostgreSQL would), then
-- VACUUM ANALYZE is run by run.sh.
--
-- Choice: the plain btree indexes a competent PostgreSQL user would create for an event table
-- queried "by event name over a time window", "by event name per user" and "one user's
-- timeline". No per-query expression indexes (e.g. on (attributes->>'price')::float8 or
-- (attributes->>'amount')::float8), no partial indexes on one event name, no GIN on attributes:
-- engage answers arbitrary attribute conditions without per-condition indexes, so neither side
-- gets indexes specialised to one benchmark query. (A GIN jsonb_path_ops index would not help
-- the numeric comparisons anyway, and q3's 7-day window already narrows it to ~1/4 of its name.)
--
--   events_pkey (event_id)                 -- from the PRIMARY KEY
--   (name, occurred_at)                    -- q3, q4, stats24h: one name over a recent window
--   (name, user_id, occurred_at)           -- q1, q2, q5: one name grouped per user; as a
--                                          -- superset of the suggested (name, user_id) it also
--                                          -- covers q1 as an index-only scan with the all-history
--                                          -- bound (occurred_at <= AS_OF) checked in the index
--   (user_id, name, occurred_at)           -- one user's events of a name in a window: the
--                                          -- "user timeline" index, and the obvious one for
--                                          -- q4's per-user NOT EXISTS probe (on the 1M-row
--                                          -- dataset the planner prefers a merge anti join
--                                          -- over two (name, user_id, ...) scans instead)
CREATE INDEX events_name_occurred_at ON events (name, occurred_at);
CREATE INDEX events_name_user_occurred_at ON events (name, user_id, occurred_at);
CREATE INDEX events_user_name_occurred_at ON events (user_id, name, occurred_at);
