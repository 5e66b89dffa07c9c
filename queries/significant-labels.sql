-- name: significant-labels
-- description: Units' best labels (train IoU) whose val IoU beats the permutation null at a false discovery rate alpha (n2vdb significance).
-- param: probe PROBE
-- param: alpha DOUBLE = 0.05
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM significance_runs WHERE probe_id = $probe)) AS run_id
)
SELECT t.filter, c.name AS label, c.category, t.rank, t.estimate AS val_iou, i.lower AS val_lower,
       i.upper AS val_upper, t.null_mean, t.p_value, t.q_value
FROM significance_tests t
JOIN chosen USING (run_id)
JOIN probes p ON p.probe_id = t.probe_id
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = t.concept_id
LEFT JOIN score_intervals i
       ON i.probe_id = t.probe_id AND i.run_id = t.run_id AND i.statistic = 'filter_iou'
      AND i.filter = t.filter AND i.concept_id = t.concept_id AND i.split = 'val'
WHERE t.probe_id = $probe AND t.test = 'label' AND t.q_value < $alpha
ORDER BY t.q_value, t.estimate DESC, t.filter, label;
