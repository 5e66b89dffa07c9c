-- What `data add` imported, file by file, so that a dataset directory that changed since is refused
-- instead of mixed into a probe (README "Datasets"). Datasets registered before this migration have no
-- rows here; they are checked against their images and concepts rows instead.
CREATE TABLE dataset_files (
    dataset_id  INTEGER NOT NULL,
    file        VARCHAR NOT NULL,          -- index.csv, label.csv, category.csv, c_*.csv; or 'masks'
    sha256      VARCHAR NOT NULL,          -- of the file; for 'masks', of one "path<TAB>bytes" line per mask
    bytes       BIGINT NOT NULL,           -- the file's size; for 'masks', the total of the masks' sizes
    PRIMARY KEY (dataset_id, file)
);
