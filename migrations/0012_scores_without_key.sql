-- image_concept_scores without its PRIMARY KEY. The key's index had to be held in memory by every
-- write of the table, and the table has a row per (image, concept, method) of a probe: 2.2 million
-- best-filter rows for all of Broden. Writing 2.2 million rows took +297 MB of peak RSS with the key
-- and +58 MB without it (a bare DuckDB test; 544,000 rows, the 16,000-image Broden profile's:
-- +79 MB and +37 MB), so an ingest's memory grew with the dataset at the IoU and embedding stages.
-- Uniqueness is kept by the one writer instead: each stage replaces its methods' rows of a probe in
-- one transaction (store/writer.replace_probe_rows), and queries/integrity.sql counts any
-- (probe, image, concept, method) stored twice. The rows are copied as they are.
CREATE TABLE image_concept_scores_unkeyed (
    probe_id    INTEGER NOT NULL,
    image_id    INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,
    method      VARCHAR NOT NULL,          -- 'best_filter' | 'segmentation' | 'classification'
    intersection BIGINT,
    union_      BIGINT,
    iou         DOUBLE,
    score       DOUBLE                     -- classification: predicted probability
);
INSERT INTO image_concept_scores_unkeyed BY NAME SELECT * FROM image_concept_scores;
DROP TABLE image_concept_scores;
ALTER TABLE image_concept_scores_unkeyed RENAME TO image_concept_scores;
