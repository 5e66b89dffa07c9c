-- The public schema of n2vdb (README "Schema"). Later migrations add, never edit.

CREATE SEQUENCE dataset_ids START 1;
CREATE TABLE datasets (
    dataset_id  INTEGER PRIMARY KEY DEFAULT nextval('dataset_ids'),
    name        VARCHAR NOT NULL UNIQUE,
    path        VARCHAR NOT NULL,
    n_images    INTEGER NOT NULL,
    n_concepts  INTEGER NOT NULL,
    added_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE images (
    dataset_id  INTEGER NOT NULL,
    image_id    INTEGER NOT NULL,          -- row number in index.csv, from 0
    path        VARCHAR NOT NULL,          -- relative to the dataset directory
    split       VARCHAR NOT NULL,          -- 'train' | 'val'
    ih INTEGER NOT NULL, iw INTEGER NOT NULL,   -- image size
    sh INTEGER NOT NULL, sw INTEGER NOT NULL,   -- segmentation size
    PRIMARY KEY (dataset_id, image_id)
);

CREATE TABLE concepts (
    dataset_id  INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,          -- Broden label number
    name        VARCHAR NOT NULL,
    category    VARCHAR NOT NULL,          -- primary category (largest count in label.csv)
    categories  VARCHAR[] NOT NULL,        -- every category the label appears in
    level       VARCHAR NOT NULL,          -- 'pixel' (masks) | 'image' (whole-image labels)
    frequency   INTEGER,
    coverage    DOUBLE,
    PRIMARY KEY (dataset_id, concept_id)
);

CREATE TABLE image_concepts (
    dataset_id  INTEGER NOT NULL,
    image_id    INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,
    pixels      INTEGER NOT NULL,          -- labelled pixels at segmentation size; image-level = sh*sw
    PRIMARY KEY (dataset_id, image_id, concept_id)
);

CREATE SEQUENCE probe_ids START 1;
CREATE TABLE probes (
    probe_id    INTEGER PRIMARY KEY DEFAULT nextval('probe_ids'),
    probe_key   VARCHAR NOT NULL UNIQUE,   -- hash of every setting that changes results
    model       VARCHAR NOT NULL,
    weights     VARCHAR NOT NULL,
    layer       VARCHAR NOT NULL,
    dataset_id  INTEGER NOT NULL,
    source_probe_id INTEGER,               -- a variant reuses this probe's activations
    n_filters   INTEGER,
    height      INTEGER,
    width       INTEGER,
    settings    JSON NOT NULL,
    status      VARCHAR NOT NULL,          -- extracting | thresholds | iou | embeddings | complete
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at TIMESTAMP
);

-- Quantised activations, one row per image: codes = uint8 [K, H, W] (C order), and
-- value = code * scales[k + 1] where scales[k + 1] = filter k's max in that image / 255.
-- pooled = the exact spatial mean of the float activations (classification embeddings).
CREATE TABLE activations (
    probe_id    INTEGER NOT NULL,
    image_id    INTEGER NOT NULL,
    scales      FLOAT[] NOT NULL,
    codes       BLOB NOT NULL,
    pooled      FLOAT[] NOT NULL,
    PRIMARY KEY (probe_id, image_id)
);

-- One dequantised activation from SQL: filter (0-based), position = y * W + x, hw = H * W.
CREATE MACRO activation(codes, scales, filter, position, hw) AS
    ('0x' || substr(hex(codes), 2 * (filter * hw + position) + 1, 2))::INTEGER * scales[filter + 1];

CREATE TABLE filters (
    probe_id    INTEGER NOT NULL,
    filter      INTEGER NOT NULL,
    threshold   DOUBLE NOT NULL,
    threshold_bound DOUBLE NOT NULL,       -- |threshold - exact float quantile| <= this
    max_value   DOUBLE NOT NULL,
    mean_value  DOUBLE NOT NULL,
    PRIMARY KEY (probe_id, filter)
);

CREATE TABLE filter_concept_iou (
    probe_id    INTEGER NOT NULL,
    filter      INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,
    split       VARCHAR NOT NULL,
    intersection BIGINT NOT NULL,
    union_      BIGINT NOT NULL,
    iou         DOUBLE NOT NULL,
    PRIMARY KEY (probe_id, filter, concept_id, split)
);

CREATE TABLE embeddings (
    probe_id    INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,
    kind        VARCHAR NOT NULL,          -- 'segmentation' | 'classification'
    n_filters   INTEGER NOT NULL,          -- K for the full embedding, F for sufficiency runs
    weights     FLOAT[] NOT NULL,          -- length K; filters outside the top F are 0
    bias        DOUBLE NOT NULL,
    train_score DOUBLE,                    -- seg: set IoU; cls: balanced accuracy
    val_score   DOUBLE,
    val_ap      DOUBLE,                    -- cls only: average precision on the unbalanced val set
    PRIMARY KEY (probe_id, concept_id, kind, n_filters)
);

CREATE TABLE image_concept_scores (
    probe_id    INTEGER NOT NULL,
    image_id    INTEGER NOT NULL,
    concept_id  INTEGER NOT NULL,
    method      VARCHAR NOT NULL,          -- 'best_filter' | 'segmentation' | 'classification'
    intersection BIGINT,
    union_      BIGINT,
    iou         DOUBLE,
    score       DOUBLE,                    -- classification: predicted probability
    PRIMARY KEY (probe_id, image_id, concept_id, method)
);
