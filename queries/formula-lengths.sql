-- name: formula-lengths
-- description: A layer's units by formula length (labels in it) and the mix of categories their labels come from.
-- param: probe PROBE
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM formula_runs WHERE probe_id = $probe)) AS run_id
),
final AS (
    SELECT f.filter, f.n_labels, f.iou, f.gain, max_step FROM unit_formulas f
    JOIN chosen USING (run_id)
    JOIN (SELECT filter, max(step) AS max_step FROM formula_beams JOIN chosen USING (run_id)
          WHERE probe_id = $probe GROUP BY filter) m USING (filter)
    WHERE f.probe_id = $probe
),
mix AS (
    SELECT t.filter, string_agg(DISTINCT c.category, ' + ' ORDER BY c.category) AS categories
    FROM formula_terms t JOIN chosen USING (run_id) JOIN final f ON f.filter = t.filter AND t.step = f.max_step
    JOIN probes p ON p.probe_id = t.probe_id
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = t.concept_id
    WHERE t.probe_id = $probe AND t.rank = 1
    GROUP BY t.filter
)
SELECT f.n_labels, m.categories, count(*) AS units, avg(f.iou) AS mean_iou, avg(f.gain) AS mean_gain
FROM final f JOIN mix m USING (filter)
GROUP BY f.n_labels, m.categories
ORDER BY f.n_labels, units DESC, m.categories;
