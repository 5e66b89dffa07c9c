-- name: sufficiency
-- description: Filters a concept needs: the smallest F whose retrained embedding reaches 90% of the full one (method.md section 6).
-- param: concept VARCHAR = NULL
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH runs AS (
    SELECT c.name AS concept, c.category, e.n_filters, e.val_score, p.n_filters AS k
    FROM embeddings e
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
    WHERE e.probe_id = $probe AND e.kind = $kind AND e.val_score IS NOT NULL
      AND ($concept IS NULL OR c.name = $concept OR regexp_replace(c.name, '-[a-z]$', '') = $concept)
),
full_runs AS (SELECT concept, val_score AS full_score FROM runs WHERE n_filters = k),
target AS (
    SELECT f.concept, f.full_score,
           CASE WHEN $kind = 'segmentation' THEN 0.9 * f.full_score
                ELSE 0.5 + 0.9 * (f.full_score - 0.5) END AS goal
    FROM full_runs f
)
SELECT r.concept, r.category, t.full_score,
       min(r.n_filters) FILTER (WHERE r.val_score >= t.goal) AS filters_needed,
       string_agg(r.n_filters || ':' || round(r.val_score, 3), ' ' ORDER BY r.n_filters) AS curve
FROM runs r JOIN target t USING (concept)
GROUP BY r.concept, r.category, t.full_score
ORDER BY filters_needed NULLS LAST, r.concept;
