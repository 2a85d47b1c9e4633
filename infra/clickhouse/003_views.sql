-- Analyst views over the raw tables (001) with the stream's attribution rules
-- (streams/units.py). Applied with the other files; CREATE OR REPLACE keeps them current.
--
-- The attribution window belongs to each experiment's config, which ClickHouse does not
-- hold, so the views that attribute outcomes are parameterised views: pass the experiment
-- and its window (attribution_window_s * 1000, see `abstream experiment show ID`):
--
--   SELECT * FROM {db}.unit_metrics(experiment_id = 'checkout', window_ms = 259200000)
--
-- Parameters rather than a hard-coded default: a wrong window would give numbers that
-- disagree with the stream's without saying so, and a missing parameter is an error.
-- analysis/offline.py queries the same views, so the report and analysts share one rule.
--
-- Exposure: the stream fixes a unit's variant and exposure time by its first processed
-- assignment; ClickHouse does not know processing order, so here it is the earliest by
-- event time (ties by event_id). The two agree whenever a unit's assignments reach Kafka
-- in event-time order, as a router's do.

-- One row per (experiment, unit): the exposure.
CREATE OR REPLACE VIEW {db}.exposures AS
SELECT
    experiment_id,
    unit_id,
    argMin(variant, (event_time, event_id)) AS variant,
    min(event_time) AS exposed_time,
    argMin(segment, (event_time, event_id)) AS segment,
    count() AS assignments,
    arrayCount(v -> v != variant, groupArray(assignments.variant)) AS other_variant_assignments
FROM {db}.assignments
GROUP BY experiment_id, unit_id;

-- One row per exposed unit of one experiment: its attributed metric totals.
-- totals: outcomes with exposed_time <= event_time < exposed_time + window, summed by metric
-- (a binary metric is totals[m] > 0, a continuous one totals[m], a ratio two of them);
-- all_totals: every outcome of the unit whatever its time (pre-experiment covariates);
-- the three counts are the outcome fates of streams/units.py.
CREATE OR REPLACE VIEW {db}.unit_metrics AS
SELECT
    e.experiment_id AS experiment_id,
    e.unit_id AS unit_id,
    any(e.variant) AS variant,
    any(e.exposed_time) AS exposed_time,
    toDate(any(e.exposed_time)) AS exposure_day,
    any(e.segment) AS segment,
    sumMapIf(map(o.metric, o.value),
             o.event_id != '' AND o.t_ms >= toUnixTimestamp64Milli(e.exposed_time)
             AND o.t_ms < toUnixTimestamp64Milli(e.exposed_time) + {window_ms:UInt64}) AS totals,
    sumMapIf(map(o.metric, o.value), o.event_id != '') AS all_totals,
    countIf(o.event_id != '' AND o.t_ms >= toUnixTimestamp64Milli(e.exposed_time)
            AND o.t_ms < toUnixTimestamp64Milli(e.exposed_time) + {window_ms:UInt64}) AS attributed_outcomes,
    countIf(o.event_id != '' AND o.t_ms < toUnixTimestamp64Milli(e.exposed_time)) AS before_exposure_outcomes,
    countIf(o.event_id != '' AND o.t_ms >= toUnixTimestamp64Milli(e.exposed_time) + {window_ms:UInt64}) AS after_window_outcomes
FROM (SELECT * FROM {db}.exposures WHERE experiment_id = {experiment_id:String}) AS e
LEFT JOIN (
    SELECT unit_id, event_id, metric, value, toUnixTimestamp64Milli(event_time) AS t_ms
    FROM {db}.outcomes WHERE experiment_id = {experiment_id:String}
) AS o ON o.unit_id = e.unit_id
GROUP BY e.experiment_id, e.unit_id;

-- One row per (exposed unit, whole day since its exposure) with attributed outcomes in
-- that day: the input of novelty checks (is the effect in a unit's first day larger than
-- later?). days_since_exposure = floor((event_time - exposed_time) / 1 day).
CREATE OR REPLACE VIEW {db}.unit_day_metrics AS
SELECT
    e.unit_id AS unit_id,
    any(e.variant) AS variant,
    any(e.exposed_time) AS exposed_time,
    intDiv(o.t_ms - toUnixTimestamp64Milli(e.exposed_time), 86400000) AS days_since_exposure,
    sumMap(map(o.metric, o.value)) AS totals
FROM (SELECT * FROM {db}.exposures WHERE experiment_id = {experiment_id:String}) AS e
INNER JOIN (
    SELECT unit_id, metric, value, toUnixTimestamp64Milli(event_time) AS t_ms
    FROM {db}.outcomes WHERE experiment_id = {experiment_id:String}
) AS o ON o.unit_id = e.unit_id
WHERE o.t_ms >= toUnixTimestamp64Milli(e.exposed_time)
  AND o.t_ms < toUnixTimestamp64Milli(e.exposed_time) + {window_ms:UInt64}
GROUP BY e.unit_id, days_since_exposure;

-- One row per (experiment, day, variant): new exposures and prediction traffic; latency
-- quantiles are exact, NULL on a day without predictions.
CREATE OR REPLACE VIEW {db}.experiment_daily AS
SELECT
    experiment_id,
    day,
    variant,
    x.new_units AS new_units,
    p.predictions AS predictions,
    p.errors AS errors,
    p.timeouts AS timeouts,
    if(p.predictions = 0, NULL, p.latency_p50_ms) AS latency_p50_ms,
    if(p.predictions = 0, NULL, p.latency_p95_ms) AS latency_p95_ms,
    if(p.predictions = 0, NULL, p.latency_p99_ms) AS latency_p99_ms,
    if(p.predictions = 0, NULL, p.mean_score) AS mean_score
FROM (
    SELECT experiment_id, toDate(exposed_time) AS day, variant, count() AS new_units
    FROM {db}.exposures GROUP BY experiment_id, day, variant
) AS x
FULL OUTER JOIN (
    SELECT
        experiment_id, toDate(event_time) AS day, variant,
        count() AS predictions,
        countIf(status = 'error') AS errors,
        countIf(status = 'timeout') AS timeouts,
        quantileExact(0.5)(latency_ms) AS latency_p50_ms,
        quantileExact(0.95)(latency_ms) AS latency_p95_ms,
        quantileExact(0.99)(latency_ms) AS latency_p99_ms,
        avg(score) AS mean_score
    FROM {db}.predictions GROUP BY experiment_id, day, variant
) AS p USING (experiment_id, day, variant);

-- One row per shadow run, with the stream's agreement rule (streams/units.py): runs whose
-- challenger answered ok are compared on labels when both models gave one, else on scores,
-- which disagree when they fall on different sides of 0.5.
CREATE OR REPLACE VIEW {db}.shadow_pairs AS
SELECT
    experiment_id,
    unit_id,
    request_id,
    event_time,
    concat(champion_model, ':', champion_version) AS champion,
    concat(challenger_model, ':', challenger_version) AS challenger,
    champion_score,
    challenger_score,
    champion_label,
    challenger_label,
    challenger_status,
    challenger_score - champion_score AS score_diff,
    challenger_latency_ms - champion_latency_ms AS latency_diff_ms,
    challenger_status = 'ok' AND ((champion_label IS NOT NULL AND challenger_label IS NOT NULL)
        OR (champion_score IS NOT NULL AND challenger_score IS NOT NULL)) AS compared,
    if(NOT compared, NULL,
       if(champion_label IS NOT NULL AND challenger_label IS NOT NULL,
          champion_label != challenger_label,
          (champion_score >= 0.5) != (challenger_score >= 0.5))) AS disagree
FROM {db}.shadow;
