-- name: weight-iou-correlation
-- description: Per concept, Pearson r across filters between its segmentation embedding weights and the filters' train IoUs.
-- param: probe PROBE
WITH weights AS (
    SELECT e.concept_id, unnest(range(len(e.weights))) AS filter, unnest(e.weights) AS weight
    FROM embeddings e JOIN probes p USING (probe_id)
    WHERE e.probe_id = $probe AND e.kind = 'segmentation' AND e.n_filters = p.n_filters
)
SELECT c.name AS concept, c.category, corr(w.weight, coalesce(i.iou, 0)) AS pearson_r, count(*) AS filters
FROM weights w
JOIN probes p ON p.probe_id = $probe
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = w.concept_id
LEFT JOIN filter_concept_iou i
       ON i.probe_id = $probe AND i.split = 'train' AND i.concept_id = w.concept_id AND i.filter = w.filter
GROUP BY c.name, c.category
ORDER BY pearson_r DESC NULLS LAST;
