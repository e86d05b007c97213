-- stats24h "products sold in the last 24 hours, per hour": product_purchased counted per one-hour
-- bucket over [AS_OF - 24h, AS_OF), all 24 buckets including empty ones, oldest first, with the
-- 24 hours' total on every row. Buckets start at AS_OF - 24h (date_bin), so they need no time
-- zone and AS_OF need not fall on the hour.
WITH b AS (
    SELECT gs AS bucket
    FROM generate_series(:'as_of'::timestamptz - interval '24 hours',
                         :'as_of'::timestamptz - interval '1 hour',
                         interval '1 hour') AS gs
), c AS (
    SELECT date_bin(interval '1 hour', occurred_at,
                    :'as_of'::timestamptz - interval '24 hours') AS bucket,
           count(*) AS n
    FROM events
    WHERE name = 'product_purchased'
      AND occurred_at >= :'as_of'::timestamptz - interval '24 hours'
      AND occurred_at <  :'as_of'::timestamptz
    GROUP BY 1
)
SELECT b.bucket, coalesce(c.n, 0) AS n, sum(coalesce(c.n, 0)) OVER () AS total
FROM b
LEFT JOIN c USING (bucket)
ORDER BY b.bucket;
