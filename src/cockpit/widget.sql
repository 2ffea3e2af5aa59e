-- Lead widget, one statement. $1 scope ('own'|'territory'|'all', echoed only), $2 caller id,
-- $3 caller territory, $4 now (timestamptz). {{SCOPE}} is replaced before preparing by
--   own: owner_user_id = $2   territory: territory = $3   all: true
-- (one prepared statement per scope, so each gets the plan and indexes of its scope).
WITH
b AS (          -- every boundary computed once; 7 days = 168 h exactly, whatever the session TimeZone
    SELECT $4::timestamptz AS now, w7, w14,
           cockpit_day($4::timestamptz) AS today, cockpit_day(w7) AS d7, cockpit_day(w14) AS d14
    FROM (SELECT $4::timestamptz - interval '168 hours' AS w7,
                 $4::timestamptz - interval '336 hours' AS w14) w
),
edges AS (      -- the days the rate windows cut in two: [w14, end of its day), the whole day
                -- of w7, [start of today, now). Only these are read from followups itself.
    SELECT w14 AS lo, (d14 + 1)::timestamp AT TIME ZONE 'Europe/Berlin' AS hi FROM b
    UNION ALL
    SELECT d7::timestamp AT TIME ZONE 'Europe/Berlin', (d7 + 1)::timestamp AT TIME ZONE 'Europe/Berlin' FROM b
    UNION ALL
    SELECT today::timestamp AT TIME ZONE 'Europe/Berlin', now FROM b
),
win AS (        -- per window (cur = [now-7d, now), prev = [now-14d, now-7d)) and type
    SELECT f.sent_at >= b.w7 AS cur, f.followup_type = 'T7' AS t7, count(*) AS n,   -- booleans: no text sort
           count(*) FILTER (WHERE f.responded_at IS NOT NULL) AS responded,
           count(*) FILTER (WHERE f.converted_at IS NOT NULL) AS converted
    FROM edges e
    JOIN followups f ON f.sent_at >= e.lo AND f.sent_at < e.hi
    CROSS JOIN b
    WHERE f.status = 'SENT' AND NOT f.lead_deleted AND {{SCOPE}}
      AND f.sent_at >= b.w14 AND f.sent_at < b.now
    GROUP BY 1, 2
    UNION ALL   -- whole days strictly inside a window
    SELECT d.day > b.d7, d.followup_type = 'T7', sum(d.sent), sum(d.responded), sum(d.converted)
    FROM cockpit_followup_daily d CROSS JOIN b
    WHERE {{SCOPE}}
      AND d.day > (SELECT d14 FROM b) AND d.day < (SELECT today FROM b) AND d.day <> b.d7
    GROUP BY 1, 2
),
rates AS (
    SELECT coalesce(sum(n) FILTER (WHERE cur AND NOT t7), 0)         AS t3_n,
           coalesce(sum(responded) FILTER (WHERE cur AND NOT t7), 0) AS t3_resp,
           coalesce(sum(converted) FILTER (WHERE cur AND NOT t7), 0) AS t3_conv,
           coalesce(sum(n) FILTER (WHERE cur AND t7), 0)         AS t7_n,
           coalesce(sum(responded) FILTER (WHERE cur AND t7), 0) AS t7_resp,
           coalesce(sum(converted) FILTER (WHERE cur AND t7), 0) AS t7_conv,
           coalesce(sum(n) FILTER (WHERE NOT cur), 0)                  AS prev_n,
           coalesce(sum(responded) FILTER (WHERE NOT cur), 0)          AS prev_resp,
           coalesce(sum(converted) FILTER (WHERE NOT cur), 0)          AS prev_conv
    FROM win
),
daily AS (      -- the 14 Berlin days ending today, every day present
    SELECT day, coalesce(s.t3, 0) AS t3, coalesce(s.t7, 0) AS t7,
           coalesce(a.responses, 0) AS responses, coalesce(a.conversions, 0) AS conversions
    FROM (SELECT (SELECT today FROM b) - 14 + i AS day FROM generate_series(1, 14) i) days
    LEFT JOIN (SELECT day, sum(sent) FILTER (WHERE followup_type = 'T3') AS t3,
                           sum(sent) FILTER (WHERE followup_type = 'T7') AS t7
               FROM cockpit_followup_daily
               WHERE {{SCOPE}}
                 AND day BETWEEN cockpit_day($4::timestamptz) - 13 AND cockpit_day($4::timestamptz)
               GROUP BY 1) s USING (day)
    LEFT JOIN (SELECT day, sum(responses) AS responses, sum(conversions) AS conversions
               FROM cockpit_activity_daily
               WHERE {{SCOPE}}
                 AND day BETWEEN cockpit_day($4::timestamptz) - 13 AND cockpit_day($4::timestamptz)
               GROUP BY 1) a USING (day)
),
counts AS (
    SELECT coalesce(sum(n) FILTER (WHERE status <> 'DELETED'), 0)     AS total,
           coalesce(sum(n) FILTER (WHERE status = 'REGISTERED'), 0)   AS registered,
           coalesce(sum(n) FILTER (WHERE status = 'ACTIVE'), 0)       AS active,
           coalesce(sum(n) FILTER (WHERE status = 'REMINDER'), 0)     AS reminder,
           coalesce(sum(n) FILTER (WHERE status = 'GRACE_PERIOD'), 0) AS grace_period,
           coalesce(sum(n) FILTER (WHERE status = 'QUALIFIED'), 0)    AS qualified,
           coalesce(sum(n) FILTER (WHERE status = 'CONVERTED'), 0)    AS converted,
           coalesce(sum(n) FILTER (WHERE status = 'LOST'), 0)         AS lost,
           coalesce(sum(n) FILTER (WHERE status = 'EXPIRED'), 0)      AS expired
    FROM cockpit_lead_counts
    WHERE {{SCOPE}}
),
recent_activities AS (
    SELECT a.lead_id, l.company_name, a.activity_type, a.occurred_at, a.user_id, a.id
    FROM (SELECT id, lead_id, activity_type, occurred_at, user_id
          FROM lead_activities
          WHERE NOT lead_deleted AND {{SCOPE}}
          ORDER BY occurred_at DESC, id DESC
          LIMIT 10) a
    JOIN leads l ON l.id = a.lead_id
),
recent_followups AS (
    SELECT f.lead_id, l.company_name, f.followup_type, f.at, f.status = 'SENT' AS success, f.id
    FROM (SELECT id, lead_id, followup_type, status, coalesce(sent_at, failed_at) AS at
          FROM followups
          WHERE status IN ('SENT', 'FAILED') AND NOT lead_deleted AND {{SCOPE}}
          ORDER BY coalesce(sent_at, failed_at) DESC, id DESC
          LIMIT 10) f
    JOIN leads l ON l.id = f.lead_id
)
SELECT jsonb_build_object(
    'scope', $1::text, 'userId', $2::text, 'territory', $3::text, 'asOf', cockpit_ts($4::timestamptz),
    'leadStats', (SELECT jsonb_build_object(
                      'total', total, 'registered', registered, 'active', active,
                      'reminder', reminder, 'gracePeriod', grace_period, 'qualified', qualified,
                      'converted', converted, 'lost', lost, 'expired', expired) FROM counts),
    'pendingT3Count', (SELECT count(*) FROM leads
                       WHERE status = 'ACTIVE' AND NOT clock_stopped AND email_consent
                         AND NOT contact_blocked AND t3_sent_at IS NULL AND {{SCOPE}}
                         AND registered_at <= $4::timestamptz - interval '72 hours'),
    'pendingT7Count', (SELECT count(*) FROM leads
                       WHERE status = 'ACTIVE' AND NOT clock_stopped AND email_consent
                         AND NOT contact_blocked AND t3_sent_at IS NOT NULL AND t7_sent_at IS NULL
                         AND {{SCOPE}} AND registered_at <= $4::timestamptz - interval '168 hours'),
    'completedT3Today', (SELECT t3 FROM daily WHERE day = cockpit_day($4::timestamptz)),
    'completedT7Today', (SELECT t7 FROM daily WHERE day = cockpit_day($4::timestamptz)),
    't3ResponseRate',   CASE WHEN t3_n > 0 THEN t3_resp::float8 / t3_n ELSE 0.0 END,
    't7ResponseRate',   CASE WHEN t7_n > 0 THEN t7_resp::float8 / t7_n ELSE 0.0 END,
    't3ConversionRate', CASE WHEN t3_n > 0 THEN t3_conv::float8 / t3_n ELSE 0.0 END,
    't7ConversionRate', CASE WHEN t7_n > 0 THEN t7_conv::float8 / t7_n ELSE 0.0 END,
    'responseTrend', cockpit_trend(
        CASE WHEN t3_n + t7_n > 0 THEN (t3_resp + t7_resp)::float8 / (t3_n + t7_n) ELSE 0.0 END,
        CASE WHEN prev_n > 0 THEN prev_resp::float8 / prev_n ELSE 0.0 END),
    'conversionTrend', cockpit_trend(
        CASE WHEN t3_n + t7_n > 0 THEN (t3_conv + t7_conv)::float8 / (t3_n + t7_n) ELSE 0.0 END,
        CASE WHEN prev_n > 0 THEN prev_conv::float8 / prev_n ELSE 0.0 END),
    'daily', (SELECT jsonb_agg(jsonb_build_object(
                  'date', day, 't3Sent', t3, 't7Sent', t7,
                  'responses', responses, 'conversions', conversions) ORDER BY day)
              FROM daily),
    'recentActivities', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                             'leadId', lead_id, 'companyName', company_name, 'type', activity_type,
                             'occurredAt', cockpit_ts(occurred_at), 'userId', user_id)
                             ORDER BY occurred_at DESC, id DESC), '[]')
                         FROM recent_activities),
    'recentFollowUps', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                            'leadId', lead_id, 'companyName', company_name,
                            'followUpType', followup_type, 'sentAt', cockpit_ts(at),
                            'success', success)
                            ORDER BY at DESC, id DESC), '[]')
                        FROM recent_followups))
FROM rates
