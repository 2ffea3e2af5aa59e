-- Follow-up mails (issue "Follow-up automation").
--
-- mail_outbox: the mail of a claimed follow-up, queued in the same transaction as the claim
-- (followups row QUEUED) and its FOLLOW_UP activity. The dispatcher drains it with retries and
-- backoff; only a delivered mail marks the follow-up SENT (and the lead's t3/t7_sent_at), only
-- the last failed attempt marks it FAILED. The message holds PII (recipient, salutation), so it
-- is sealed with the PII vault (AES-GCM, associated data = lead id + "mail"); metrics and logs
-- use the non-PII columns only.
CREATE TABLE mail_outbox (
    id               uuid PRIMARY KEY,
    followup_id      uuid NOT NULL REFERENCES followups (id),
    lead_id          uuid NOT NULL REFERENCES leads (id),
    followup_type    text NOT NULL CHECK (followup_type IN ('T3', 'T7')),
    territory        text NOT NULL,
    template         text NOT NULL CHECK (length(template) <= 100),
    status           text NOT NULL CHECK (status IN ('QUEUED', 'SENDING', 'SENT', 'FAILED')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL,
    -- While SENDING: the claim expires here (a crashed dispatcher's mail is taken up again).
    claimed_until    timestamptz,
    key_id           text NOT NULL,
    message          bytea NOT NULL,
    last_error       text CHECK (length(last_error) <= 500),   -- never PII
    created_at       timestamptz NOT NULL,
    sent_at          timestamptz,
    failed_at        timestamptz,
    CHECK (status <> 'SENT' OR sent_at IS NOT NULL),
    CHECK (status <> 'SENDING' OR claimed_until IS NOT NULL)
);
-- At most one open mail per follow-up (a FAILED one may be queued again by a later run).
CREATE UNIQUE INDEX mail_outbox_open_idx ON mail_outbox (followup_id)
    WHERE status IN ('QUEUED', 'SENDING');
CREATE INDEX mail_outbox_due_idx ON mail_outbox (next_attempt_at) WHERE status = 'QUEUED';
CREATE INDEX mail_outbox_claimed_idx ON mail_outbox (claimed_until) WHERE status = 'SENDING';

ALTER TABLE mail_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE mail_outbox FORCE ROW LEVEL SECURITY;
-- Only the job and the dispatcher (system) read or write mails; no user role sees them.
CREATE POLICY mail_outbox_system ON mail_outbox FOR ALL
    USING ((SELECT app_role()) = 'system') WITH CHECK ((SELECT app_role()) = 'system');

-- Unsubscribe links already used: a replayed link changes nothing, even after consent was
-- given again. One row per token (the follow-up id the mail carried).
CREATE TABLE unsubscribe_redemptions (
    token_id     uuid PRIMARY KEY,
    lead_id      uuid NOT NULL REFERENCES leads (id),
    redeemed_at  timestamptz NOT NULL
);
ALTER TABLE unsubscribe_redemptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE unsubscribe_redemptions FORCE ROW LEVEL SECURITY;
CREATE POLICY unsubscribe_redemptions_system ON unsubscribe_redemptions FOR ALL
    USING ((SELECT app_role()) = 'system') WITH CHECK ((SELECT app_role()) = 'system');

-- Leads due for a follow-up, oldest first, for the job's batched claim (the pending indexes of
-- 0002 lead with owner_user_id for the widget's per-owner counts).
CREATE INDEX leads_due_t3_idx ON leads (registered_at)
    WHERE status = 'ACTIVE' AND NOT clock_stopped AND email_consent AND NOT contact_blocked
          AND t3_sent_at IS NULL;
CREATE INDEX leads_due_t7_idx ON leads (t3_sent_at)
    WHERE status = 'ACTIVE' AND NOT clock_stopped AND email_consent AND NOT contact_blocked
          AND t3_sent_at IS NOT NULL AND t7_sent_at IS NULL;
