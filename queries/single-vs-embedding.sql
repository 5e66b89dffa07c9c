-- name: single-vs-embedding
-- description: Per category, mean val set IoU of the best single filter (chosen on train) vs the segmentation embedding, with bootstrap intervals where n2vdb significance ran.
-- param: probe PROBE
WITH best AS (SELECT concept_id, filter FROM best_filters WHERE probe_id = $probe),
single AS (
    SELECT b.concept_id, b.filter, v.iou
    FROM best b JOIN filter_concept_iou v
      ON v.probe_id = $probe AND v.split = 'val' AND v.concept_id = b.concept_id AND v.filter = b.filter
),
paired AS (
    SELECT c.category, s.concept_id, s.filter, s.iou AS single_iou, e.val_score AS embedding_iou
    FROM single s
    JOIN probes p ON p.probe_id = $probe
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = s.concept_id
    JOIN embeddings e ON e.probe_id = $probe AND e.concept_id = s.concept_id
                     AND e.kind = 'segmentation' AND e.n_filters = p.n_filters
    WHERE c.level = 'pixel' AND e.val_score IS NOT NULL
),
replicates AS (  -- each concept's two IoUs in every bootstrap replicate of the latest significance run
    SELECT p.category, i.statistic, unnest(range(len(i.replicates))) AS replicate, unnest(i.replicates) AS value
    FROM paired p
    JOIN intervals i ON i.probe_id = $probe AND i.concept_id = p.concept_id AND i.split = 'val'
     AND (i.statistic = 'embedding_iou' OR (i.statistic = 'filter_iou' AND i.filter = p.filter))
),
means AS (  -- a category's mean in each replicate (over the concepts the replicate drew an image of)
    SELECT coalesce(category, 'all') AS category, statistic, replicate, avg(value) AS mean
    FROM replicates WHERE NOT isnan(value)
    GROUP BY GROUPING SETS ((category, statistic, replicate), (statistic, replicate))
),
bounds AS (
    SELECT m.category, m.statistic,
           percentile_of(list(m.mean), (1 - r.level) / 2) AS lower,
           percentile_of(list(m.mean), (1 + r.level) / 2) AS upper
    FROM means m
    JOIN latest_significance l ON l.probe_id = $probe
    JOIN significance_runs r USING (probe_id, run_id)
    GROUP BY m.category, m.statistic, r.level
),
summary AS (
    SELECT coalesce(category, 'all') AS category, count(*) AS concepts,
           avg(single_iou) AS single_filter_iou, avg(embedding_iou) AS embedding_iou,
           avg(embedding_iou) / nullif(avg(single_iou), 0) AS ratio
    FROM paired
    GROUP BY ROLLUP (category)
)
SELECT s.category, s.concepts, s.single_filter_iou, f.lower AS single_filter_lower, f.upper AS single_filter_upper,
       s.embedding_iou, e.lower AS embedding_lower, e.upper AS embedding_upper, s.ratio
FROM summary s
LEFT JOIN bounds f ON f.category = s.category AND f.statistic = 'filter_iou'
LEFT JOIN bounds e ON e.category = s.category AND e.statistic = 'embedding_iou'
ORDER BY s.category = 'all', s.category;
