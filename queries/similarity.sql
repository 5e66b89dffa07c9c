-- name: similarity
-- description: Cosine similarity of two concepts' full embeddings.
-- param: a CONCEPT
-- param: b CONCEPT
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
SELECT x.name AS a, y.name AS b, list_cosine_similarity(x.weights, y.weights) AS similarity
FROM full_embeddings x JOIN full_embeddings y USING (probe_id, kind)
WHERE x.probe_id = $probe AND x.kind = $kind AND x.name = $a AND y.name = $b;
