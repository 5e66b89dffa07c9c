-- Significance (n2vdb/significance, docs/significance.md): bootstrap intervals beside the stored
-- scores, and permutation p-values and q-values. A probe may hold several runs, one per setting; a
-- run's rows are written in one transaction with its significance_runs row, so a run that exists is
-- whole. The views below read each probe's latest run.
CREATE TABLE significance_runs (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,        -- 1, 2, ... within the probe
    settings_key  VARCHAR NOT NULL,        -- hash of settings: the same settings find the same run
    settings      JSON NOT NULL,
    replicates    INTEGER NOT NULL,        -- Poisson bootstrap replicates
    level         DOUBLE NOT NULL,         -- the intervals' confidence level
    labels        INTEGER NOT NULL,        -- each unit's top labels (train IoU) tested
    filters       INTEGER NOT NULL,        -- each concept's top filters (train IoU) given intervals
    permutations  INTEGER NOT NULL,        -- null draws per label test
    block         INTEGER NOT NULL,        -- val images of one size a permutation re-pairs
    seed          BIGINT NOT NULL,
    interval      VARCHAR NOT NULL,        -- 'percentile'
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (probe_id, run_id),
    UNIQUE (probe_id, settings_key)
);
-- One row per interval. statistic:
--   'filter_iou'     (filter, concept, split): set IoU of one filter, as filter_concept_iou;
--   'embedding_iou'  (concept, 'val'; filter NULL): the segmentation embedding's val IoU;
--   'embedding_gain' (concept, 'val'; filter = the best filter): embedding IoU - best filter IoU,
--                    both on val, paired (the same bootstrap weights on both);
--   'classification_accuracy' (concept, 'val'; filter NULL): the classification embedding's accuracy
--                    on its balanced val pairs (embeddings.val_score), each pair weighted by its image.
-- replicates: the statistic in each bootstrap replicate (NaN where a replicate drew no image), so
-- any aggregate's interval is SQL: quantiles over replicates of, say, a category's mean.
CREATE TABLE score_intervals (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,
    statistic     VARCHAR NOT NULL,
    filter        INTEGER,
    concept_id    INTEGER NOT NULL,
    split         VARCHAR NOT NULL,
    estimate      DOUBLE,
    lower         DOUBLE,
    upper         DOUBLE,
    replicates    FLOAT[] NOT NULL
);
-- One row per test. test:
--   'label'          (filter, concept): the unit's val IoU with one of its top labels (rank: by train
--                    IoU) against the permutation null; null_mean is the null's mean IoU;
--   'embedding_gain' (filter = best filter, concept): embedding beats best filter, paired bootstrap.
-- q_value: Benjamini-Hochberg over the tests of the same kind in the run.
CREATE TABLE significance_tests (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,
    test          VARCHAR NOT NULL,
    filter        INTEGER NOT NULL,
    concept_id    INTEGER NOT NULL,
    rank          INTEGER,
    estimate      DOUBLE NOT NULL,
    null_mean     DOUBLE,
    p_value       DOUBLE NOT NULL,
    q_value       DOUBLE NOT NULL,
    PRIMARY KEY (probe_id, run_id, test, filter, concept_id)
);
CREATE VIEW latest_significance AS
SELECT probe_id, max(run_id) AS run_id FROM significance_runs GROUP BY probe_id;
CREATE VIEW intervals AS
SELECT i.*
FROM score_intervals i JOIN latest_significance USING (probe_id, run_id);
CREATE VIEW tests AS
SELECT t.* FROM significance_tests t JOIN latest_significance USING (probe_id, run_id);
-- The Q-quantile of a list, interpolated between ranks as quantile_cont (and numpy's default) does;
-- for a quantile that is not a constant, such as one from a run's level, which quantile_cont refuses.
CREATE MACRO percentile_of(xs, q) AS
    list_sort(xs)[floor((len(xs) - 1) * q)::BIGINT + 1]
    + ((len(xs) - 1) * q - floor((len(xs) - 1) * q))
      * (list_sort(xs)[ceil((len(xs) - 1) * q)::BIGINT + 1] - list_sort(xs)[floor((len(xs) - 1) * q)::BIGINT + 1]);
