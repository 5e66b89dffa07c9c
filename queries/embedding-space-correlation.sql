-- name: embedding-space-correlation
-- description: How alike two probes' embedding spaces are (method.md section 8): Pearson r between their concept-concept cosine similarities (the Gram matrices of L2-normalised full embeddings), over each pair of concepts (by name) that both probes embed.
-- param: probe_a PROBE
-- param: probe_b PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH a AS (SELECT name, weights FROM full_embeddings WHERE probe_id = $probe_a AND kind = $kind),
b AS (SELECT name, weights FROM full_embeddings WHERE probe_id = $probe_b AND kind = $kind),
shared AS (SELECT a.name, a.weights AS wa, b.weights AS wb FROM a JOIN b USING (name)),
pairs AS (
    SELECT list_cosine_similarity(x.wa, y.wa) AS sim_a, list_cosine_similarity(x.wb, y.wb) AS sim_b
    FROM shared x JOIN shared y ON x.name < y.name
)
SELECT $probe_a AS probe_a, $probe_b AS probe_b,
       (SELECT count(*) FROM shared) AS shared_concepts,
       count(*) AS concept_pairs,
       corr(sim_a, sim_b) AS pearson_r
FROM pairs;
