-- name: concept-formulas
-- description: The units whose formula uses a concept, with the operator it enters by.
-- param: concept CONCEPT
-- param: probe PROBE
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM formula_runs WHERE probe_id = $probe)) AS run_id
),
target AS (
    SELECT c.concept_id FROM concepts c JOIN probes p USING (dataset_id)
    WHERE p.probe_id = $probe AND c.name = $concept
)
SELECT f.filter, t.op, t.position, f.formula, f.iou, f.best_label, f.best_label_iou
FROM unit_formulas f
JOIN chosen USING (run_id)
JOIN (SELECT max(step) AS step, filter FROM formula_beams JOIN chosen USING (run_id)
      WHERE probe_id = $probe GROUP BY filter) last USING (filter)
JOIN formula_terms t
  ON t.probe_id = f.probe_id AND t.run_id = f.run_id AND t.filter = f.filter AND t.step = last.step AND t.rank = 1
WHERE f.probe_id = $probe AND t.concept_id = (SELECT concept_id FROM target)
ORDER BY f.iou DESC, f.filter;
