-- name: best-filters
-- description: A concept's top single filters by train IoU, beside the filters its segmentation embedding weights most.
-- param: concept CONCEPT
-- param: k INTEGER(1..) = 10
-- param: probe PROBE
WITH target AS (
    SELECT c.concept_id FROM concepts c JOIN probes p USING (dataset_id)
    WHERE p.probe_id = $probe AND c.name = $concept
),
by_iou AS (
    SELECT row_number() OVER (ORDER BY t.iou DESC, t.filter) AS rank, t.filter, t.iou AS train_iou, v.iou AS val_iou
    FROM filter_concept_iou t
    LEFT JOIN filter_concept_iou v
           ON v.probe_id = t.probe_id AND v.filter = t.filter AND v.concept_id = t.concept_id AND v.split = 'val'
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
SELECT coalesce(i.rank, w.rank) AS rank, i.filter AS iou_filter, i.train_iou, i.val_iou,
       w.filter AS weight_filter, w.weight
FROM by_iou i FULL JOIN by_weight w USING (rank)
WHERE coalesce(i.rank, w.rank) <= $k
ORDER BY rank;
