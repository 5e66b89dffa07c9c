-- name: nearest
-- description: Concepts nearest to CONCEPT by cosine similarity of their full embeddings (method.md section 8).
-- param: concept CONCEPT
-- param: k INTEGER(1..) = 10
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH mine AS (SELECT concept_id, name, category, weights FROM full_embeddings WHERE probe_id = $probe AND kind = $kind),
target AS (SELECT concept_id, weights FROM mine WHERE name = $concept)
SELECT row_number() OVER (ORDER BY similarity DESC) AS rank, concept, category, similarity
FROM (
    SELECT f.name AS concept, f.category, list_cosine_similarity(f.weights, t.weights) AS similarity
    FROM mine f, target t
    WHERE f.concept_id <> t.concept_id
)
ORDER BY similarity DESC
LIMIT $k;
