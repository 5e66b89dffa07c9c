-- name: filter-concepts
-- description: Per filter, the pixel-level concepts it is the best single filter for (train IoU), with their val IoUs and the best one's bootstrap interval where n2vdb significance ran.
-- param: probe PROBE
-- param: min_concepts INTEGER(0..) = 1
WITH best AS (SELECT concept_id, filter FROM best_pixel_filters WHERE probe_id = $probe)
SELECT b.filter,
       count(*) AS n_concepts,
       string_agg(c.name, ', ' ORDER BY v.iou DESC) AS concepts,
       max(v.iou) AS best_val_iou,
       arg_max(i.lower, [v.iou, -b.concept_id]) AS best_val_lower,
       arg_max(i.upper, [v.iou, -b.concept_id]) AS best_val_upper
FROM best b
JOIN probes p ON p.probe_id = $probe
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = b.concept_id
LEFT JOIN filter_concept_iou v
       ON v.probe_id = $probe AND v.filter = b.filter AND v.concept_id = b.concept_id AND v.split = 'val'
LEFT JOIN intervals i
       ON i.probe_id = $probe AND i.statistic = 'filter_iou' AND i.filter = b.filter AND i.concept_id = b.concept_id
      AND i.split = 'val'
GROUP BY b.filter
HAVING count(*) >= $min_concepts
ORDER BY n_concepts DESC, b.filter;
