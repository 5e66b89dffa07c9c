-- name: concept-distribution
-- description: The paper's non-maximal view (method.md section 9): every image of the probe, containing the concept or not, with the concept's classification-embedding score sigmoid(w . pooled activations + b) and its quantile among all images; `n2vdb show concept NAME --over all` draws images across it.
-- param: concept CONCEPT
-- param: probe PROBE
WITH target AS (
    SELECT c.concept_id, e.weights, e.bias
    FROM embeddings e
    JOIN probes p USING (probe_id)
    JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
    WHERE e.probe_id = $probe AND e.kind = 'classification' AND e.n_filters = p.n_filters AND c.name = $concept
),
scored AS (
    SELECT a.image_id, i.split,
           EXISTS (SELECT 1 FROM image_concepts ic
                   WHERE ic.dataset_id = p.dataset_id AND ic.image_id = a.image_id
                     AND ic.concept_id = t.concept_id) AS contains,
           1 / (1 + exp(-(list_dot_product(a.pooled, t.weights) + t.bias))) AS score
    FROM target t
    JOIN probes p ON p.probe_id = $probe
    JOIN activations a ON a.probe_id = coalesce(p.source_probe_id, p.probe_id)
    JOIN images i ON i.dataset_id = p.dataset_id AND i.image_id = a.image_id
)
SELECT image_id, split, contains, score, percent_rank() OVER (ORDER BY score, image_id) AS quantile
FROM scored
ORDER BY score DESC, image_id;
