-- name: concept-scores
-- description: Per concept: val IoU of its best single filter (chosen on train), of its segmentation embedding (with bootstrap intervals where n2vdb significance ran), and classification accuracy.
-- param: probe PROBE
WITH best AS (SELECT concept_id, filter FROM best_filters WHERE probe_id = $probe)
SELECT c.name AS concept, c.category, c.level, b.filter AS best_filter, v.iou AS single_filter_iou,
       vi.lower AS single_filter_lower, vi.upper AS single_filter_upper, seg.val_score AS embedding_iou,
       si.lower AS embedding_lower, si.upper AS embedding_upper, cls.val_score AS classification_accuracy,
       ci.lower AS classification_lower, ci.upper AS classification_upper, cls.val_ap AS classification_ap
FROM concepts c
JOIN probes p ON p.probe_id = $probe AND c.dataset_id = p.dataset_id
LEFT JOIN best b ON b.concept_id = c.concept_id
LEFT JOIN filter_concept_iou v
       ON v.probe_id = $probe AND v.split = 'val' AND v.concept_id = c.concept_id AND v.filter = b.filter
LEFT JOIN intervals vi ON vi.probe_id = $probe AND vi.statistic = 'filter_iou' AND vi.split = 'val'
                      AND vi.concept_id = c.concept_id AND vi.filter = b.filter
LEFT JOIN intervals si ON si.probe_id = $probe AND si.statistic = 'embedding_iou' AND si.concept_id = c.concept_id
LEFT JOIN intervals ci ON ci.probe_id = $probe AND ci.statistic = 'classification_accuracy'
                      AND ci.concept_id = c.concept_id
LEFT JOIN embeddings seg ON seg.probe_id = $probe AND seg.concept_id = c.concept_id
                        AND seg.kind = 'segmentation' AND seg.n_filters = p.n_filters
LEFT JOIN embeddings cls ON cls.probe_id = $probe AND cls.concept_id = c.concept_id
                        AND cls.kind = 'classification' AND cls.n_filters = p.n_filters
WHERE b.filter IS NOT NULL OR cls.val_score IS NOT NULL
ORDER BY embedding_iou DESC NULLS LAST, concept;
