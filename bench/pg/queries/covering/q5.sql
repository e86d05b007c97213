-- q5 "spent over 1000 in total", reading the generated column (see covering.sql).
WITH m AS (
    SELECT user_id
    FROM events
    WHERE name = 'payment'
      AND occurred_at <= :'as_of'::timestamptz
    GROUP BY user_id
    HAVING sum(amount) > 1000
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
