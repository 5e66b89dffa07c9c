-- How long each stage of a probe took, on what, and the process's peak memory by its end: the data
-- behind the ingest summary, `n2vdb probes` and bench/scale.py. A re-run stage replaces its row.
CREATE TABLE stage_timings (
    probe_id     INTEGER NOT NULL,
    stage        VARCHAR NOT NULL,   -- extraction | thresholds | iou | segmentation | classification | *-sufficiency
    seconds      DOUBLE NOT NULL,
    images       BIGINT,             -- images the stage went through
    pairs        BIGINT,             -- (image, concept) pairs it worked on, where that applies (per epoch for training)
    peak_rss_mb  DOUBLE,             -- the process's peak resident memory when the stage ended
    recorded_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (probe_id, stage)
);
