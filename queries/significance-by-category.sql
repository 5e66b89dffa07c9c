-- name: significance-by-category
-- description: Of the units whose best label (train IoU) reaches an IoU cut-off on val (NetDissect's 0.04), how many beat the permutation null at q < alpha, per category.
-- param: probe PROBE
-- param: cutoff DOUBLE = 0.04
-- param: alpha DOUBLE = 0.05
-- param: run INTEGER(0..) = 0
WITH chosen AS (
    SELECT coalesce(nullif($run, 0), (SELECT max(run_id) FROM significance_runs WHERE probe_id = $probe)) AS run_id
),
labelled AS (  -- each unit's best label (rank 1), where its val IoU reaches the cut-off
    SELECT c.category, t.q_value
    FROM significance_tests t
    JOIN chosen USING (run_id)
    JOIN probes p ON p.probe_id = t.probe_id
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = t.concept_id
    WHERE t.probe_id = $probe AND t.test = 'label' AND t.rank = 1 AND t.estimate >= $cutoff
)
SELECT coalesce(category, 'all') AS category, count(*) AS units,
       count(*) FILTER (WHERE q_value < $alpha) AS significant,
       count(*) FILTER (WHERE q_value < $alpha) / count(*) AS share
FROM labelled
GROUP BY ROLLUP (category)
ORDER BY category IS NULL, category;
