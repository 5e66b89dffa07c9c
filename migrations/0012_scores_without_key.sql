-- image_concept_scores without its PRIMARY KEY. The key's index had to be held in memory by every
-- write of the table, and the table has a row per (image, concept, method) of a probe: 2.2 million
-- best-filter rows for all of Broden. Writing 2.2 million rows took +303 MB of peak RSS with the key
-- and +63 MB without it (`python bench/scores_key.py`; 544,000 rows, the 16,000-image Broden
-- profile's: +94 MB and +41 MB), so an ingest's memory grew with the dataset at the IoU and
-- embedding stages.
-- Uniqueness is kept by the one writer instead: each stage replaces its methods' rows of a probe in
-- one transaction (store/writer.replace_probe_rows), and queries/integrity.sql counts any
-- (probe, image, concept, method) stored twice. The rows are copied as they are.
-- (A table made by CREATE TABLE AS has the columns and types but no constraints: NOT NULL is set again.)
CREATE TABLE image_concept_scores_unkeyed AS SELECT * FROM image_concept_scores;
ALTER TABLE image_concept_scores_unkeyed ALTER COLUMN probe_id SET NOT NULL;
ALTER TABLE image_concept_scores_unkeyed ALTER COLUMN image_id SET NOT NULL;
ALTER TABLE image_concept_scores_unkeyed ALTER COLUMN concept_id SET NOT NULL;
ALTER TABLE image_concept_scores_unkeyed ALTER COLUMN method SET NOT NULL;
DROP TABLE image_concept_scores;
ALTER TABLE image_concept_scores_unkeyed RENAME TO image_concept_scores;
