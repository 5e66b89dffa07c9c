-- name: formula-gains
-- description: Units whose formula beats their best single label by at least a margin of IoU.
-- param: probe PROBE
-- param: margin DOUBLE = 0.05
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM formula_runs WHERE probe_id = $probe)) AS run_id
)
SELECT f.filter, f.formula, f.iou, f.best_label, f.best_label_iou, f.gain, f.val_iou, f.best_label_val_iou
FROM unit_formulas f JOIN chosen USING (run_id)
WHERE f.probe_id = $probe AND f.gain >= $margin
ORDER BY f.gain DESC, f.filter;
