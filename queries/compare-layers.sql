-- name: compare-layers
-- description: Every complete probe (any model, layer and kind: map, tokens, vector) per concept category: mean val IoU of the best single unit and of the segmentation embedding (pixel concepts; NULL for vector layers), and the classification embedding's val accuracy and AP.
-- param: dataset VARCHAR = NULL
WITH probe_set AS (
    SELECT p.probe_id, p.model, p.layer, coalesce(p.settings->>'kind', 'map') AS kind, p.n_filters,
           p.height, p.width, p.dataset_id, d.name AS dataset
    FROM probes p JOIN datasets d USING (dataset_id)
    WHERE p.status = 'complete' AND ($dataset IS NULL OR d.name = $dataset)
),
best AS (  -- as the best_filters view (train split, ties to the lower unit), for these probes only
    SELECT i.probe_id, i.concept_id, arg_max(i.filter, [i.iou, -i.filter]) AS filter
    FROM filter_concept_iou i JOIN probe_set USING (probe_id)
    WHERE i.split = 'train'
    GROUP BY i.probe_id, i.concept_id
),
single AS (
    SELECT b.probe_id, b.concept_id, v.iou
    FROM best b JOIN filter_concept_iou v
      ON v.probe_id = b.probe_id AND v.concept_id = b.concept_id AND v.filter = b.filter AND v.split = 'val'
),
full_embeddings AS (
    SELECT e.probe_id, e.concept_id, e.kind, e.val_score, e.val_ap
    FROM embeddings e JOIN probe_set p ON p.probe_id = e.probe_id AND e.n_filters = p.n_filters
),
per_concept AS (
    SELECT p.probe_id, c.category,
           CASE WHEN c.level = 'pixel' THEN s.iou END AS single_iou,
           seg.val_score AS embedding_iou, cls.val_score AS accuracy, cls.val_ap AS ap
    FROM probe_set p
    JOIN concepts c ON c.dataset_id = p.dataset_id
    LEFT JOIN single s ON s.probe_id = p.probe_id AND s.concept_id = c.concept_id
    LEFT JOIN full_embeddings seg
           ON seg.probe_id = p.probe_id AND seg.concept_id = c.concept_id AND seg.kind = 'segmentation'
    LEFT JOIN full_embeddings cls
           ON cls.probe_id = p.probe_id AND cls.concept_id = c.concept_id AND cls.kind = 'classification'
    WHERE (c.level = 'pixel' AND s.iou IS NOT NULL) OR seg.val_score IS NOT NULL OR cls.val_score IS NOT NULL
)
SELECT p.probe_id, p.model, p.layer, p.kind, p.n_filters AS units, p.height || 'x' || p.width AS map,
       p.dataset, coalesce(c.category, 'all') AS category, count(*) AS concepts,
       avg(c.single_iou) AS single_unit_iou, avg(c.embedding_iou) AS embedding_iou,
       avg(c.accuracy) AS classification_accuracy, avg(c.ap) AS classification_ap
FROM per_concept c JOIN probe_set p USING (probe_id)
GROUP BY GROUPING SETS ((p.probe_id, p.model, p.layer, p.kind, p.n_filters, p.height, p.width, p.dataset, c.category),
                        (p.probe_id, p.model, p.layer, p.kind, p.n_filters, p.height, p.width, p.dataset))
ORDER BY p.probe_id, c.category IS NULL, c.category;
