-- name: single-vs-embedding
-- description: Per category, mean val set IoU of the best single filter (chosen on train) vs the segmentation embedding.
-- param: probe PROBE
WITH best AS (SELECT concept_id, filter FROM best_filters WHERE probe_id = $probe),
single AS (
    SELECT b.concept_id, v.iou
    FROM best b JOIN filter_concept_iou v
      ON v.probe_id = $probe AND v.split = 'val' AND v.concept_id = b.concept_id AND v.filter = b.filter
),
paired AS (
    SELECT c.category, s.iou AS single_iou, e.val_score AS embedding_iou
    FROM single s
    JOIN probes p ON p.probe_id = $probe
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = s.concept_id
    JOIN embeddings e ON e.probe_id = $probe AND e.concept_id = s.concept_id
                     AND e.kind = 'segmentation' AND e.n_filters = p.n_filters
    WHERE c.level = 'pixel' AND e.val_score IS NOT NULL
)
SELECT coalesce(category, 'all') AS category, count(*) AS concepts,
       avg(single_iou) AS single_filter_iou, avg(embedding_iou) AS embedding_iou,
       avg(embedding_iou) / nullif(avg(single_iou), 0) AS ratio
FROM paired
GROUP BY ROLLUP (category)
ORDER BY category IS NULL, category;
