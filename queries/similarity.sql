-- name: similarity
-- description: Cosine similarity of two concepts' full embeddings.
-- param: a CONCEPT
-- param: b CONCEPT
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH full_embeddings AS (
    SELECT c.name, e.weights
    FROM embeddings e
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
    WHERE e.probe_id = $probe AND e.kind = $kind AND e.n_filters = p.n_filters
)
SELECT x.name AS a, y.name AS b, list_cosine_similarity(x.weights, y.weights) AS similarity
FROM full_embeddings x, full_embeddings y
WHERE x.name = $a AND y.name = $b;
