-- q1 "bought more than five products": users with more than 5 product_purchased (all history).
-- First page (up to 100 user_ids ascending) plus the total number of matching users.
WITH m AS (
    SELECT user_id
    FROM events
    WHERE name = 'product_purchased'
      AND occurred_at <= :'as_of'::timestamptz
    GROUP BY user_id
    HAVING count(*) > 5
)
SELECT user_id, count(*) OVER () AS total
FROM m
ORDER BY user_id
LIMIT 100;
