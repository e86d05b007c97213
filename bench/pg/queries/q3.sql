-- q3 "bought blue shoes over $150 this week": at least one product_purchased in
-- (AS_OF - 7 days, AS_OF] with color = 'blue', category = 'shoes' and price > 150.
WITH m AS (
    SELECT DISTINCT user_id
    FROM events
    WHERE name = 'product_purchased'
      AND occurred_at >  :'as_of'::timestamptz - interval '7 days'
      AND occurred_at <= :'as_of'::timestamptz
      AND attributes->>'color' = 'blue'
      AND attributes->>'category' = 'shoes'
      AND (attributes->>'price')::float8 > 150
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
