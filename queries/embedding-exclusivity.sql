-- name: embedding-exclusivity
-- description: Filter exclusivity in the embeddings (the embedding panel of the paper's filter-exclusivity figure, method.md section 7): share of filters that carry a large normalised weight (w_k >= share x the embedding's largest |w|) in 0, 1, 2-5, 6-9, 10-14, 15-19, 20+ full embeddings of pixel-level concepts.
-- param: probe PROBE
-- param: share DOUBLE = 0.5
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH mine AS (
    SELECT concept_id, weights, list_max(list_transform(weights, lambda w: abs(w))) AS largest
    FROM full_embeddings
    WHERE probe_id = $probe AND kind = $kind AND level = 'pixel'
),
large AS (  -- (concept, filter) pairs whose normalised weight reaches the share
    SELECT f.concept_id, u.position - 1 AS filter
    FROM mine f,
         unnest(f.weights) WITH ORDINALITY AS u(w, position)
    WHERE f.largest > 0 AND u.w / f.largest >= $share
),
per_filter AS (
    SELECT f.filter, count(l.concept_id) AS n_concepts
    FROM filters f LEFT JOIN large l USING (filter)
    WHERE f.probe_id = $probe
    GROUP BY f.filter
),
binned AS (SELECT exclusivity_bin(n_concepts) AS low FROM per_filter)
SELECT bins.label AS concepts_per_filter,
       count(binned.low) AS filters,
       count(binned.low) / (SELECT count(*) FROM per_filter) AS share_of_filters
FROM exclusivity_bins bins LEFT JOIN binned USING (low)
GROUP BY bins.low, bins.label
ORDER BY bins.low;
