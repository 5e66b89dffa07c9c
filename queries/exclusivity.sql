-- name: exclusivity
-- description: Share of filters that are the best single filter (train IoU) for 0, 1, 2-5, 6-9, 10-14, 15-19, 20+ pixel-level concepts.
-- param: probe PROBE
WITH best AS (SELECT concept_id, filter FROM best_pixel_filters WHERE probe_id = $probe),
per_filter AS (
    SELECT f.filter, count(b.concept_id) AS n_concepts
    FROM filters f LEFT JOIN best b USING (filter)
    WHERE f.probe_id = $probe
    GROUP BY f.filter
),
binned AS (
    SELECT CASE
        WHEN n_concepts = 0 THEN 0 WHEN n_concepts = 1 THEN 1 WHEN n_concepts <= 5 THEN 2
        WHEN n_concepts <= 9 THEN 6 WHEN n_concepts <= 14 THEN 10 WHEN n_concepts <= 19 THEN 15 ELSE 20
    END AS low
    FROM per_filter
),
bins(low, label) AS (VALUES (0, '0'), (1, '1'), (2, '2-5'), (6, '6-9'), (10, '10-14'), (15, '15-19'), (20, '20+'))
SELECT bins.label AS concepts_per_filter,
       count(binned.low) AS filters,
       count(binned.low) / (SELECT count(*) FROM per_filter) AS share
FROM bins LEFT JOIN binned USING (low)
GROUP BY bins.low, bins.label
ORDER BY bins.low;
