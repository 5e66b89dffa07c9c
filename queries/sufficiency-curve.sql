-- name: sufficiency-curve
-- description: Mean val score of embeddings restricted to their top F filters, per F and category, relative to the full embedding.
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH runs AS (
    SELECT c.category, e.concept_id, e.n_filters, e.val_score, p.n_filters AS k
    FROM embeddings e
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
    WHERE e.probe_id = $probe AND e.kind = $kind AND e.val_score IS NOT NULL
),
full_runs AS (SELECT concept_id, val_score AS full_score FROM runs WHERE n_filters = k)
SELECT r.category, r.n_filters, count(*) AS concepts, avg(r.val_score) AS mean_score,
       avg(r.val_score / nullif(f.full_score, 0)) AS mean_share_of_full
FROM runs r JOIN full_runs f USING (concept_id)
GROUP BY ALL
ORDER BY r.category, r.n_filters;
