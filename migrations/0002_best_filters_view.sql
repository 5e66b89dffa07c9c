-- Each concept's best single filter per probe: the highest train-split IoU, ties to the lower filter
-- number (as numpy's argmax, which chooses the filters behind per-image 'best_filter' scores).
CREATE VIEW best_filters AS
SELECT probe_id, concept_id, arg_max(filter, [iou, -filter]) AS filter, max(iou) AS train_iou
FROM filter_concept_iou
WHERE split = 'train'
GROUP BY probe_id, concept_id;
