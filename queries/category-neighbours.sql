-- name: category-neighbours
-- description: For concepts of each category, the share of their K nearest neighbours (cosine) in each category.
-- param: k INTEGER(1..) = 5
-- param: probe PROBE
-- param: kind CHOICE(segmentation,classification) = segmentation
WITH mine AS (SELECT concept_id, category, weights FROM full_embeddings WHERE probe_id = $probe AND kind = $kind),
ranked AS (
    SELECT a.concept_id, a.category AS from_category, b.category AS to_category,
           row_number() OVER (PARTITION BY a.concept_id
                              ORDER BY list_cosine_similarity(a.weights, b.weights) DESC, b.concept_id) AS rank
    FROM mine a JOIN mine b ON a.concept_id <> b.concept_id
),
counted AS (
    SELECT from_category, to_category, count(*) AS hits
    FROM ranked WHERE rank <= $k
    GROUP BY ALL
)
SELECT from_category AS category, to_category AS neighbour_category,
       hits / sum(hits) OVER (PARTITION BY from_category) AS share
FROM counted
ORDER BY category, share DESC, neighbour_category;
