-- name: classification-vs-top-filter
-- description: Per category, mean balanced val accuracy of the classification embedding vs its top filter (largest |w|) retrained alone, F = 1 (method.md section 5; `n2vdb reproduce net2vec` or --sufficiency writes the F = 1 runs).
-- param: probe PROBE
WITH scored AS (
    SELECT c.category, whole.val_score AS embedding_accuracy, one.val_score AS top_filter_accuracy
    FROM embeddings whole
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = whole.concept_id
    LEFT JOIN embeddings one ON one.probe_id = whole.probe_id AND one.concept_id = whole.concept_id
                            AND one.kind = 'classification' AND one.n_filters = 1
    WHERE whole.probe_id = $probe AND whole.kind = 'classification' AND whole.n_filters = p.n_filters
      AND whole.val_score IS NOT NULL AND NOT isnan(whole.val_score)
)
SELECT coalesce(category, 'all') AS category, count(*) AS concepts,
       avg(top_filter_accuracy) AS top_filter_accuracy, avg(embedding_accuracy) AS embedding_accuracy
FROM scored
GROUP BY ROLLUP (category)
ORDER BY category IS NULL, category;
