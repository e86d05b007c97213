-- q2 "one payment over 500": users with at least one payment whose amount > 500 (all history).
WITH m AS (
    SELECT DISTINCT user_id
    FROM events
    WHERE name = 'payment'
      AND occurred_at <= :'as_of'::timestamptz
      AND (attributes->>'amount')::float8 > 500
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
