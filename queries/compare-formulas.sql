-- name: compare-formulas
-- description: The same units' formulas in two probes (two checkpoints, models or settings), latest run of each.
-- param: probe PROBE
-- param: other PROBE
WITH latest AS (
    SELECT probe_id, max(run_id) AS run_id FROM formula_runs WHERE probe_id IN ($probe, $other) GROUP BY probe_id
),
a AS (SELECT f.* FROM unit_formulas f JOIN latest USING (probe_id, run_id) WHERE f.probe_id = $probe),
b AS (SELECT f.* FROM unit_formulas f JOIN latest USING (probe_id, run_id) WHERE f.probe_id = $other)
SELECT coalesce(a.filter, b.filter) AS filter, a.formula, a.iou, b.formula AS other_formula, b.iou AS other_iou,
       a.formula = b.formula AS same_formula, a.best_label = b.best_label AS same_label
FROM a FULL JOIN b USING (filter)
ORDER BY filter;
