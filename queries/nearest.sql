-- name: nearest
-- description: Concepts nearest to CONCEPT by cosine similarity of their full embeddings (method.md section 8).
-- param: concept CONCEPT
-- param: k INTEGER(1..) = 10
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH full_embeddings AS (
    SELECT e.concept_id, c.name, c.category, e.weights
    FROM embeddings e
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
    WHERE e.probe_id = $probe AND e.kind = $kind AND e.n_filters = p.n_filters
),
target AS (SELECT concept_id, weights FROM full_embeddings WHERE name = $concept)
SELECT row_number() OVER (ORDER BY similarity DESC) AS rank, concept, category, similarity
FROM (
    SELECT f.name AS concept, f.category, list_cosine_similarity(f.weights, t.weights) AS similarity
    FROM full_embeddings f, target t
    WHERE f.concept_id <> t.concept_id
)
ORDER BY similarity DESC
LIMIT $k;
