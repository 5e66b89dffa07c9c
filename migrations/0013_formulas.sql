-- Compositional explanations (n2vdb/formulas, docs/formulas.md): each unit's best formula of labels,
-- as compexp's beam search finds it. A probe may hold several runs, one per setting (beam width,
-- length, penalty, categories, split); a run's rows are written in one transaction with its
-- formula_runs row, so a run that exists is whole.
CREATE TABLE formula_runs (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,        -- 1, 2, ... within the probe
    settings_key  VARCHAR NOT NULL,        -- hash of settings: the same settings find the same run
    settings      JSON NOT NULL,
    beam_size     INTEGER NOT NULL,
    max_length    INTEGER NOT NULL,        -- labels in a formula, at most
    penalty       DOUBLE NOT NULL,         -- score = IoU * penalty ^ (length - 1)
    categories    VARCHAR[] NOT NULL,      -- the label categories searched
    split         VARCHAR NOT NULL,        -- 'all' (compexp: every image) | 'train' (val IoU reported)
    images        INTEGER NOT NULL,        -- images searched
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (probe_id, run_id),
    UNIQUE (probe_id, settings_key)
);
-- Every beam of every step: step 0 holds the labels, step s the formulas of up to s + 1 labels; rank 1
-- of the last step is the unit's formula. length is compexp's (labels, plus one per NOT).
CREATE TABLE formula_beams (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,
    filter        INTEGER NOT NULL,
    step          INTEGER NOT NULL,
    rank          INTEGER NOT NULL,        -- 1 = best of the beam
    formula       VARCHAR NOT NULL,        -- compexp's text: '((water OR river) AND (NOT blue))'
    n_labels      INTEGER NOT NULL,
    length        INTEGER NOT NULL,
    score         DOUBLE NOT NULL,
    iou           DOUBLE NOT NULL,
    intersection  BIGINT NOT NULL,
    union_        BIGINT NOT NULL,
    val_iou       DOUBLE,                  -- split 'train' only
    PRIMARY KEY (probe_id, run_id, filter, step, rank)
);
-- The terms of each beam formula, left to right: position 0 is the first label (op 'LEAF'), then
-- each term's operator ('OR', 'AND', 'AND NOT') and label; concept_id joins concepts.
CREATE TABLE formula_terms (
    probe_id      INTEGER NOT NULL,
    run_id        INTEGER NOT NULL,
    filter        INTEGER NOT NULL,
    step          INTEGER NOT NULL,
    rank          INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    op            VARCHAR NOT NULL,
    concept_id    INTEGER NOT NULL,
    PRIMARY KEY (probe_id, run_id, filter, step, rank, position)
);
-- One row per unit and run: its formula (the last beam's best) beside its best single label.
CREATE VIEW unit_formulas AS
SELECT b.probe_id, b.run_id, b.filter, b.formula, b.n_labels, b.length, b.score, b.iou,
       b.intersection, b.union_, b.val_iou,
       l.formula AS best_label, t.concept_id AS best_label_id, l.iou AS best_label_iou,
       l.val_iou AS best_label_val_iou, b.iou - l.iou AS gain
FROM formula_beams b
JOIN formula_beams l
  ON l.probe_id = b.probe_id AND l.run_id = b.run_id AND l.filter = b.filter AND l.step = 0 AND l.rank = 1
JOIN formula_terms t
  ON t.probe_id = l.probe_id AND t.run_id = l.run_id AND t.filter = l.filter AND t.step = 0 AND t.rank = 1
WHERE b.rank = 1
  AND b.step = (SELECT max(s.step) FROM formula_beams s
                WHERE s.probe_id = b.probe_id AND s.run_id = b.run_id AND s.filter = b.filter);
