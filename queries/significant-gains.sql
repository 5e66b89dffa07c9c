-- name: significant-gains
-- description: Concepts whose segmentation embedding beats their best single filter on val at q < alpha (paired bootstrap, n2vdb significance).
-- param: probe PROBE
-- param: alpha DOUBLE = 0.05
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM significance_runs WHERE probe_id = $probe)) AS run_id
)
SELECT c.name AS concept, c.category, t.filter AS best_filter, f.estimate AS single_filter_iou,
       e.estimate AS embedding_iou, t.estimate AS gain, g.lower AS gain_lower, g.upper AS gain_upper,
       t.p_value, t.q_value
FROM significance_tests t
JOIN chosen USING (run_id)
JOIN probes p ON p.probe_id = t.probe_id
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = t.concept_id
JOIN score_intervals g
  ON g.probe_id = t.probe_id AND g.run_id = t.run_id AND g.statistic = 'embedding_gain' AND g.concept_id = t.concept_id
JOIN score_intervals e
  ON e.probe_id = t.probe_id AND e.run_id = t.run_id AND e.statistic = 'embedding_iou' AND e.concept_id = t.concept_id
JOIN score_intervals f
  ON f.probe_id = t.probe_id AND f.run_id = t.run_id AND f.statistic = 'filter_iou' AND f.split = 'val'
 AND f.filter = t.filter AND f.concept_id = t.concept_id
WHERE t.probe_id = $probe AND t.test = 'embedding_gain' AND t.q_value < $alpha
ORDER BY t.q_value, t.estimate DESC, concept;
