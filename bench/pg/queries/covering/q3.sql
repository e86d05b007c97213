-- q3 "bought blue shoes over $150 this week", reading the generated columns (see covering.sql).
WITH m AS (
    SELECT DISTINCT user_id
    FROM events
    WHERE name = 'product_purchased'
      AND occurred_at >  :'as_of'::timestamptz - interval '7 days'
      AND occurred_at <= :'as_of'::timestamptz
      AND color = 'blue'
      AND category = 'shoes'
      AND price > 150
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
