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
binned AS (SELECT exclusivity_bin(n_concepts) AS low FROM per_filter)
SELECT bins.label AS concepts_per_filter,
       count(binned.low) AS filters,
       count(binned.low) / (SELECT count(*) FROM per_filter) AS share
FROM exclusivity_bins bins LEFT JOIN binned USING (low)
GROUP BY bins.low, bins.label
ORDER BY bins.low;
