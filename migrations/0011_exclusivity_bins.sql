-- The bins of the paper's filter-exclusivity figure, written once for the two queries that count
-- concepts per filter (exclusivity: best single filters; embedding-exclusivity: large weights).

-- A filter's concept count -> the low end of its bin: 0, 1, 2-5, 6-9, 10-14, 15-19, 20+.
CREATE MACRO exclusivity_bin(n) AS CASE
    WHEN n = 0 THEN 0 WHEN n = 1 THEN 1 WHEN n <= 5 THEN 2
    WHEN n <= 9 THEN 6 WHEN n <= 14 THEN 10 WHEN n <= 19 THEN 15 ELSE 20
END;

CREATE VIEW exclusivity_bins(low, label) AS
VALUES (0, '0'), (1, '1'), (2, '2-5'), (6, '6-9'), (10, '10-14'), (15, '15-19'), (20, '20+');
