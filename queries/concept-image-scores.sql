-- name: concept-image-scores
-- description: Every image containing the concept, with its per-image IoU under METHOD (segmentation: the concept's embedding; best_filter: its best single filter), the values `n2vdb show concept` samples and summarises.
-- param: concept CONCEPT
-- param: probe PROBE
-- param: method CHOICE(segmentation,best_filter) = segmentation
SELECT s.image_id, s.iou
FROM image_concept_scores s
JOIN probes p ON p.probe_id = s.probe_id
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = s.concept_id
WHERE s.probe_id = $probe AND c.name = $concept AND s.method = $method
ORDER BY s.image_id;
