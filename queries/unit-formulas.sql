-- name: unit-formulas
-- description: Each unit's compositional formula (n2vdb formulas) beside its best single label, by IoU.
-- param: probe PROBE
-- param: run INTEGER(0..) = 0
-- param: k INTEGER(1..) = 50
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM formula_runs WHERE probe_id = $probe)) AS run_id
)
SELECT f.filter, f.formula, f.length, f.iou, f.best_label, f.best_label_iou, f.gain, f.val_iou
FROM unit_formulas f JOIN chosen USING (run_id)
WHERE f.probe_id = $probe
ORDER BY f.iou DESC, f.filter
LIMIT $k;
