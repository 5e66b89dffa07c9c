-- name: formula-beam
-- description: One unit's beam at every step of the search: what each extra label adds.
-- param: filter INTEGER(0..) = 0
-- param: probe PROBE
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM formula_runs WHERE probe_id = $probe)) AS run_id
),
best_of_step AS (
    SELECT step, max(score) AS best FROM formula_beams JOIN chosen USING (run_id)
    WHERE probe_id = $probe AND filter = $filter GROUP BY step
)
SELECT b.step, b.rank, b.formula, b.length, b.iou, b.val_iou,
       CASE WHEN b.rank = 1 THEN b.score - lag(s.best) OVER (PARTITION BY b.rank ORDER BY b.step) END AS step_gain
FROM formula_beams b JOIN chosen USING (run_id) JOIN best_of_step s USING (step)
WHERE b.probe_id = $probe AND b.filter = $filter
ORDER BY b.step, b.rank;
