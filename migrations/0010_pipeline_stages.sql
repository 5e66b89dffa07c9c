-- The ingest pipeline's stages in order, as n2vdb/pipeline.py STAGES lists them (tests/test_pipeline.py
-- asserts the two agree): a probe's status is the name of the next stage it needs, or 'complete' after
-- the last. queries/integrity.sql joins this table to check each stage's rows. A migration that adds a
-- stage replaces the rows: DELETE FROM pipeline_stages, then INSERT the whole list again.
CREATE TABLE pipeline_stages (
    position        INTEGER PRIMARY KEY,   -- 1, 2, ... in pipeline order
    stage           VARCHAR NOT NULL UNIQUE,
    fills           VARCHAR[] NOT NULL,    -- the tables it writes
    vector          BOOLEAN NOT NULL,      -- applies to vector layers (no spatial extent)
    per_extraction  BOOLEAN NOT NULL,      -- a variant probe reads its source probe's rows instead
    sharded         BOOLEAN NOT NULL,      -- `ingest --shard` runs it; `merge` imports its rows
    partial         BOOLEAN NOT NULL       -- commits as it goes: its rows exist before it is done
);
INSERT INTO pipeline_stages VALUES
    (1, 'extracting', ['activations'], true, true, true, true),
    (2, 'thresholds', ['filters'], true, false, false, false),
    (3, 'iou', ['filter_concept_iou', 'image_concept_scores'], false, false, false, false),
    (4, 'embeddings', ['embeddings', 'image_concept_scores'], true, false, false, false);

-- 'thresholds' is a status of its own now (0001 listed it; earlier versions computed thresholds as the
-- end of 'extracting', and a variant probe started at 'iou' with its thresholds still to compute).
-- Such a variant moves back to the stage it needs.
UPDATE probes SET status = 'thresholds'
WHERE status = 'iou'
  AND (SELECT count(*) FROM filters f WHERE f.probe_id = probes.probe_id) IS DISTINCT FROM n_filters;
