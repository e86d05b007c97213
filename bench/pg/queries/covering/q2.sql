-- q2 "one payment over 500", reading the generated column (see covering.sql).
WITH m AS (
    SELECT DISTINCT user_id
    FROM events
    WHERE name = 'payment'
      AND occurred_at <= :'as_of'::timestamptz
      AND amount > 500
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
