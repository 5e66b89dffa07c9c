-- name: integrity
-- description: Consistency checks of the whole database: each row names a check and how many rows break it (0 = fine).
WITH probe_images AS (
    SELECT p.probe_id, least(coalesce((p.settings->>'limit')::INTEGER, d.n_images), d.n_images) AS expected
    FROM probes p JOIN datasets d USING (dataset_id)
),
-- Where each probe stands in the pipeline (pipeline_stages, n2vdb/pipeline.py): the position of the
-- stage its status names, past the last when complete, NULL for a status that is no stage.
probe_position AS (
    SELECT p.probe_id,
           CASE WHEN p.status = 'complete' THEN (SELECT max(position) + 1 FROM pipeline_stages)
                ELSE (SELECT s.position FROM pipeline_stages s WHERE s.stage = p.status) END AS position
    FROM probes p
),
-- Each probe, stage that applies to it, and table that stage fills: done once the probe is past it,
-- filling while a stage that commits as it goes is the probe's current one.
probe_stage_tables AS (
    SELECT p.probe_id, s.stage, unnest(s.fills) AS tbl, s.position < a.position AS done,
           s.position = a.position AND s.partial AS filling
    FROM probes p
    JOIN probe_position a USING (probe_id)
    JOIN pipeline_stages s
      ON (s.vector OR coalesce(p.settings->>'kind', 'map') <> 'vector')
     AND NOT (s.per_extraction AND p.source_probe_id IS NOT NULL)
),
-- The probes with rows in each table one stage fills alone (image_concept_scores is shared by two
-- stages, by method: the checks of segmentation rows below name its methods).
filled AS (
    SELECT DISTINCT 'activations' AS tbl, probe_id FROM activations
    UNION ALL SELECT DISTINCT 'filters', probe_id FROM filters
    UNION ALL SELECT DISTINCT 'filter_concept_iou', probe_id FROM filter_concept_iou
    UNION ALL SELECT DISTINCT 'embeddings', probe_id FROM embeddings
)
SELECT 'images without a dataset' AS check_name,
       (SELECT count(*) FROM images i ANTI JOIN datasets d USING (dataset_id)) AS violations
UNION ALL SELECT 'image_concepts without an image or concept',
       (SELECT count(*) FROM image_concepts ic
        WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.dataset_id = ic.dataset_id AND i.image_id = ic.image_id)
           OR NOT EXISTS (SELECT 1 FROM concepts c WHERE c.dataset_id = ic.dataset_id AND c.concept_id = ic.concept_id))
UNION ALL SELECT 'datasets whose n_images disagrees with images',
       (SELECT count(*) FROM datasets d WHERE n_images <> (SELECT count(*) FROM images i WHERE i.dataset_id = d.dataset_id))
UNION ALL SELECT 'probes without a dataset or with a missing source probe',
       (SELECT count(*) FROM probes p WHERE NOT EXISTS (SELECT 1 FROM datasets d WHERE d.dataset_id = p.dataset_id)
           OR (p.source_probe_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM probes s WHERE s.probe_id = p.source_probe_id)))
UNION ALL SELECT 'activations of unknown probes or images',
       (SELECT count(*) FROM activations a LEFT JOIN probes p USING (probe_id)
        WHERE p.probe_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM images i WHERE i.dataset_id = p.dataset_id AND i.image_id = a.image_id))
UNION ALL SELECT 'activations whose size disagrees with the probe',
       (SELECT count(*) FROM activations a JOIN probes p USING (probe_id)
        WHERE octet_length(a.codes) <> p.n_filters * p.height * p.width OR len(a.scales) <> p.n_filters
           OR len(a.pooled) <> p.n_filters)
UNION ALL SELECT 'probes at a status that is no pipeline stage',
       (SELECT count(*) FROM probe_position WHERE position IS NULL)
UNION ALL SELECT 'probes past extraction with missing activations',
       (SELECT count(*) FROM probe_stage_tables t JOIN probe_images e USING (probe_id)
        WHERE t.tbl = 'activations' AND t.done
          AND (SELECT count(*) FROM activations a WHERE a.probe_id = t.probe_id) <> e.expected)
UNION ALL SELECT 'probes past thresholds without one threshold per filter',
       (SELECT count(*) FROM probe_stage_tables t JOIN probes p USING (probe_id)
        WHERE t.tbl = 'filters' AND t.done
          AND (SELECT count(*) FROM filters f WHERE f.probe_id = p.probe_id) IS DISTINCT FROM p.n_filters)
UNION ALL SELECT 'probes past a stage without rows in a table it fills',
       (SELECT count(*) FROM probe_stage_tables t
        -- every table but the shared one: a new stage's table that `filled` does not list fails here
        WHERE t.done AND t.tbl <> 'image_concept_scores'
          AND NOT EXISTS (SELECT 1 FROM filled f WHERE f.tbl = t.tbl AND f.probe_id = t.probe_id))
UNION ALL SELECT 'vector probes with segmentation rows (IoU, segmentation embeddings or per-image IoU)',
       (SELECT count(*) FROM probes p WHERE p.settings->>'kind' = 'vector' AND (
            EXISTS (SELECT 1 FROM filter_concept_iou i WHERE i.probe_id = p.probe_id)
         OR EXISTS (SELECT 1 FROM embeddings e WHERE e.probe_id = p.probe_id AND e.kind = 'segmentation')
         OR EXISTS (SELECT 1 FROM image_concept_scores s WHERE s.probe_id = p.probe_id
                    AND s.method IN ('best_filter', 'segmentation'))))
UNION ALL SELECT 'rows of unfinished stages',
       (SELECT count(DISTINCT t.probe_id) FROM probe_stage_tables t JOIN filled f USING (tbl, probe_id)
        WHERE NOT t.done AND NOT t.filling)
UNION ALL SELECT 'IoU, embedding or score rows of unknown probes, filters or concepts',
       (SELECT count(*) FROM filter_concept_iou i LEFT JOIN probes p USING (probe_id)
        WHERE p.probe_id IS NULL OR i.filter >= p.n_filters
           OR NOT EXISTS (SELECT 1 FROM concepts c WHERE c.dataset_id = p.dataset_id AND c.concept_id = i.concept_id))
     + (SELECT count(*) FROM embeddings e LEFT JOIN probes p USING (probe_id)
        WHERE p.probe_id IS NULL OR len(e.weights) <> p.n_filters)
     + (SELECT count(*) FROM image_concept_scores s LEFT JOIN probes p USING (probe_id)
        WHERE p.probe_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM image_concepts ic
            WHERE ic.dataset_id = p.dataset_id AND ic.image_id = s.image_id AND ic.concept_id = s.concept_id))
-- image_concept_scores has no PRIMARY KEY (its index grew an ingest's memory with the dataset:
-- migrations/0012): its one writer keeps the key unique, and this check keeps the writer honest.
UNION ALL SELECT 'per-image scores stored twice (the same probe, image, concept and method)',
       (SELECT coalesce(sum(n - 1), 0) FROM (
            SELECT count(*) AS n FROM image_concept_scores
            GROUP BY probe_id, image_id, concept_id, method HAVING count(*) > 1))
UNION ALL SELECT 'IoU rows whose iou disagrees with intersection / union',
       (SELECT count(*) FROM filter_concept_iou
        WHERE union_ <= 0 OR intersection > union_ OR abs(iou - intersection / union_) > 1e-9)
-- NaN or infinity anywhere is a result computed from nonsense (a NULL score is "not defined", and allowed).
UNION ALL SELECT 'NaN or infinite stored numbers',
       (SELECT count(*) FROM filters
        WHERE NOT (isfinite(threshold) AND isfinite(threshold_bound) AND isfinite(max_value) AND isfinite(mean_value)))
     + (SELECT count(*) FROM filter_concept_iou WHERE NOT isfinite(iou))
     + (SELECT count(*) FROM embeddings
        WHERE len(list_filter(weights, lambda x: NOT isfinite(x))) > 0 OR NOT isfinite(bias)
           OR NOT isfinite(train_score) OR NOT isfinite(val_score) OR NOT isfinite(val_ap))
     + (SELECT count(*) FROM image_concept_scores WHERE NOT isfinite(iou) OR NOT isfinite(score))
     + (SELECT count(*) FROM activations
        WHERE len(list_filter(scales, lambda x: NOT isfinite(x))) > 0
           OR len(list_filter(pooled, lambda x: NOT isfinite(x))) > 0);
