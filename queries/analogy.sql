-- name: analogy
-- description: Concepts nearest to A - B + C on L2-normalised embeddings (A is to B as ? is to C).
-- param: a CONCEPT
-- param: b CONCEPT
-- param: c CONCEPT
-- param: k INTEGER(1..) = 5
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH unit AS (
    SELECT name, category, list_transform(weights, lambda w: w / sqrt(list_dot_product(weights, weights))) AS v
    FROM full_embeddings
    WHERE probe_id = $probe AND kind = $kind
),
query AS (
    SELECT list_transform(list_zip(a.v, b.v, c.v), lambda t: t[1] - t[2] + t[3]) AS v
    FROM unit a, unit b, unit c
    WHERE a.name = $a AND b.name = $b AND c.name = $c
)
SELECT row_number() OVER (ORDER BY similarity DESC) AS rank, concept, category, similarity
FROM (
    SELECT u.name AS concept, u.category, list_cosine_similarity(u.v, q.v) AS similarity
    FROM unit u, query q
    WHERE u.name NOT IN ($a, $b, $c)
)
ORDER BY similarity DESC
LIMIT $k;
