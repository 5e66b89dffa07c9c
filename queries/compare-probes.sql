-- name: compare-probes
-- description: One concept across every probe (models, layers, weights): best single filter vs embeddings, with bootstrap intervals where n2vdb significance ran (two probes differ where their intervals do not overlap).
-- param: concept CONCEPT
WITH target AS (
    SELECT p.probe_id, c.concept_id
    FROM probes p JOIN concepts c USING (dataset_id)
    WHERE c.name = $concept
),
best AS (  -- as the best_filters view, restricted to one concept first (3x faster than the view here)
    SELECT i.probe_id, arg_max(i.filter, [i.iou, -i.filter]) AS filter
    FROM filter_concept_iou i JOIN target t USING (probe_id, concept_id)
    WHERE i.split = 'train'
    GROUP BY i.probe_id
)
SELECT p.probe_id, p.model, p.layer, p.weights, d.name AS dataset, p.n_filters,
       b.filter AS best_filter, v.iou AS single_filter_iou, vi.lower AS single_filter_lower,
       vi.upper AS single_filter_upper, seg.val_score AS embedding_iou, si.lower AS embedding_lower,
       si.upper AS embedding_upper, cls.val_score AS classification_accuracy, ci.lower AS classification_lower,
       ci.upper AS classification_upper
FROM target t
JOIN probes p USING (probe_id)
JOIN datasets d ON d.dataset_id = p.dataset_id
LEFT JOIN best b USING (probe_id)
LEFT JOIN filter_concept_iou v
       ON v.probe_id = t.probe_id AND v.concept_id = t.concept_id AND v.filter = b.filter AND v.split = 'val'
LEFT JOIN intervals vi ON vi.probe_id = t.probe_id AND vi.statistic = 'filter_iou' AND vi.split = 'val'
                      AND vi.concept_id = t.concept_id AND vi.filter = b.filter
LEFT JOIN intervals si ON si.probe_id = t.probe_id AND si.statistic = 'embedding_iou' AND si.concept_id = t.concept_id
LEFT JOIN intervals ci ON ci.probe_id = t.probe_id AND ci.statistic = 'classification_accuracy'
                      AND ci.concept_id = t.concept_id
LEFT JOIN embeddings seg ON seg.probe_id = t.probe_id AND seg.concept_id = t.concept_id
                        AND seg.kind = 'segmentation' AND seg.n_filters = p.n_filters
LEFT JOIN embeddings cls ON cls.probe_id = t.probe_id AND cls.concept_id = t.concept_id
                        AND cls.kind = 'classification' AND cls.n_filters = p.n_filters
ORDER BY p.probe_id;
