-- Views the named queries share, so each idea is written once.

-- Every probe's full embeddings (n_filters = K: not the sufficiency retrainings), with the concept's
-- name, category and level.
CREATE VIEW full_embeddings AS
SELECT e.probe_id, e.kind, e.concept_id, c.name, c.category, c.level, e.weights, e.bias,
       e.train_score, e.val_score, e.val_ap
FROM embeddings e
JOIN probes p USING (probe_id)
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = e.concept_id
WHERE e.n_filters = p.n_filters;

-- best_filters restricted to pixel-level concepts, the ones single filters segment (Network
-- Dissection's and the paper's exclusivity count only these).
CREATE VIEW best_pixel_filters AS
SELECT b.probe_id, b.concept_id, b.filter, b.train_iou
FROM best_filters b
JOIN probes p USING (probe_id)
JOIN concepts c ON c.dataset_id = p.dataset_id AND c.concept_id = b.concept_id
WHERE c.level = 'pixel';
