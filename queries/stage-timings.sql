-- name: stage-timings
-- description: Seconds, images, (image, concept) pairs and peak RSS of each stage of a probe, with ms per image.
-- param: probe PROBE
SELECT stage, round(seconds, 2) AS seconds, images, pairs,
       round(1000 * seconds / nullif(images, 0), 2) AS ms_per_image, round(peak_rss_mb) AS peak_rss_mb
FROM stage_timings
WHERE probe_id = $probe
ORDER BY list_position(['extraction', 'thresholds', 'iou', 'segmentation', 'segmentation-sufficiency',
                        'classification', 'classification-sufficiency'], stage), stage
