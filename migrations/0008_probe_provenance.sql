-- The software a probe was computed with (n2vdb, torch, torchvision, numpy, duckdb, python), as JSON.
-- Not part of probe_key: a newer torch resumes the same probe; this column says what ran.
ALTER TABLE probes ADD COLUMN provenance JSON;
