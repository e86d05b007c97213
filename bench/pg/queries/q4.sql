-- q4 "added to cart but bought nothing in 3 days": at least one cart_added in
-- (AS_OF - 3 days, AS_OF] and no product_purchased in that same window.
WITH m AS (
    SELECT DISTINCT c.user_id
    FROM events c
    WHERE c.name = 'cart_added'
      AND c.occurred_at >  :'as_of'::timestamptz - interval '3 days'
      AND c.occurred_at <= :'as_of'::timestamptz
      AND NOT EXISTS (
          SELECT 1
          FROM events p
          WHERE p.user_id = c.user_id
            AND p.name = 'product_purchased'
            AND p.occurred_at >  :'as_of'::timestamptz - interval '3 days'
            AND p.occurred_at <= :'as_of'::timestamptz
      )
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
