-- name: best-filters
-- description: A concept's top single filters by train IoU (with bootstrap intervals where n2vdb significance ran), beside the filters its segmentation embedding weights most.
-- param: concept CONCEPT
-- param: k INTEGER(1..) = 10
-- param: probe PROBE
WITH target AS (
    SELECT c.concept_id FROM concepts c JOIN probes p USING (dataset_id)
    WHERE p.probe_id = $probe AND c.name = $concept
),
by_iou AS (
    SELECT row_number() OVER (ORDER BY t.iou DESC, t.filter) AS rank, t.filter, t.iou AS train_iou,
           ti.lower AS train_lower, ti.upper AS train_upper, v.iou AS val_iou, vi.lower AS val_lower, vi.upper AS val_upper
    FROM filter_concept_iou t
    LEFT JOIN filter_concept_iou v
           ON v.probe_id = t.probe_id AND v.filter = t.filter AND v.concept_id = t.concept_id AND v.split = 'val'
    LEFT JOIN intervals ti
           ON ti.probe_id = t.probe_id AND ti.statistic = 'filter_iou' AND ti.filter = t.filter
          AND ti.concept_id = t.concept_id AND ti.split = 'train'
    LEFT JOIN intervals vi
           ON vi.probe_id = t.probe_id AND vi.statistic = 'filter_iou' AND vi.filter = t.filter
          AND vi.concept_id = t.concept_id AND vi.split = 'val'
    WHERE t.probe_id = $probe AND t.split = 'train' AND t.concept_id = (SELECT concept_id FROM target)
),
by_weight AS (
    SELECT row_number() OVER (ORDER BY abs(w.weight) DESC, w.filter) AS rank, w.filter, w.weight
    FROM (
        SELECT unnest(range(len(e.weights))) AS filter, unnest(e.weights) AS weight
        FROM embeddings e JOIN probes p USING (probe_id)
        WHERE e.probe_id = $probe AND e.kind = 'segmentation' AND e.n_filters = p.n_filters
          AND e.concept_id = (SELECT concept_id FROM target)
    ) w
)
SELECT coalesce(i.rank, w.rank) AS rank, i.filter AS iou_filter, i.train_iou, i.train_lower, i.train_upper,
       i.val_iou, i.val_lower, i.val_upper,
       w.filter AS weight_filter, w.weight
FROM by_iou i FULL JOIN by_weight w USING (rank)
WHERE coalesce(i.rank, w.rank) <= $k
ORDER BY rank;
