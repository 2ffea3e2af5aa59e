-- FreshPlan Leads schema: reference data, leads, activities, audit, outbox/inbox.
--
-- Runs as the owner role (never as the application role). Row-level security is
-- ENABLEd and FORCEd on every table so that even the owner is subject to it; the
-- application role gets plain privileges and the policies decide which rows.
--
-- Identity comes from transaction-local settings (set_config(..., true)):
--   app.user_id, app.role, app.territory
-- An unset or empty setting is NULL, and every policy below is false for NULL,
-- so a transaction without an identity sees no rows and may write none (fail closed).

CREATE FUNCTION app_user() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('app.user_id', true), '') $$;
CREATE FUNCTION app_role() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('app.role', true), '') $$;
CREATE FUNCTION app_territory() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('app.territory', true), '') $$;

-- True when the current identity may see a row with this territory, owner and
-- collaborators. Shared by leads, outbox (event audience) and projections.
CREATE FUNCTION app_can_see(row_territory text, row_owner text, row_collaborators text[])
    RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        app_role() IN ('admin', 'system')
        OR (app_role() IN ('manager', 'viewer') AND row_territory = app_territory())
        OR (app_role() = 'sales' AND app_user() IS NOT NULL
            AND (row_owner = app_user() OR app_user() = ANY (row_collaborators))),
        false)
$$;

-- Same for changes: viewers change nothing.
CREATE FUNCTION app_can_change(row_territory text, row_owner text, row_collaborators text[])
    RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        app_role() IN ('admin', 'system')
        OR (app_role() = 'manager' AND row_territory = app_territory())
        OR (app_role() = 'sales' AND app_user() IS NOT NULL
            AND (row_owner = app_user() OR app_user() = ANY (row_collaborators))),
        false)
$$;

CREATE TABLE territories (
    code      text PRIMARY KEY CHECK (code IN ('DE', 'AT', 'CH')),
    name      text NOT NULL,
    currency  text NOT NULL,
    vat_rate  numeric(5, 2) NOT NULL
);
INSERT INTO territories VALUES
    ('DE', 'Deutschland', 'EUR', 19.00),
    ('AT', 'Österreich', 'EUR', 20.00),
    ('CH', 'Schweiz', 'CHF', 8.10);

CREATE TABLE users (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('admin', 'manager', 'sales', 'viewer')),
    territory   text NOT NULL REFERENCES territories (code),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE leads (
    id                 uuid PRIMARY KEY,
    company_name       text NOT NULL CHECK (length(company_name) BETWEEN 1 AND 200),
    -- PII: AEAD ciphertext (nonce || ciphertext || tag), key id beside it.
    contact_person_ct  bytea,
    email_ct           bytea,
    phone_ct           bytea,
    pii_key_id         text,
    -- Keyed hashes (HMAC-SHA-256 of the normalised value) for exact-match lookup.
    email_hash         bytea,
    phone_hash         bytea,
    city               text CHECK (length(city) <= 120),
    territory          text NOT NULL REFERENCES territories (code),
    business_type      text NOT NULL CHECK (business_type IN ('RESTAURANT', 'HOTEL', 'CATERING',
                           'KANTINE', 'GROSSHANDEL', 'LEH', 'BILDUNG', 'GESUNDHEIT', 'SONSTIGES')),
    source             text NOT NULL CHECK (source IN ('MESSE', 'EMPFEHLUNG', 'TELEFON',
                           'WEB_FORMULAR', 'PARTNER', 'SONSTIGES')),
    owner_user_id      text NOT NULL,
    -- Collaborators live on the lead row: the RLS policy reads them without a
    -- second table (a lead_collaborators table would make the policies recursive).
    collaborators      text[] NOT NULL DEFAULT '{}',
    status             text NOT NULL CHECK (status IN ('REGISTERED', 'ACTIVE', 'REMINDER',
                           'GRACE_PERIOD', 'QUALIFIED', 'CONVERTED', 'LOST', 'EXPIRED', 'DELETED')),
    email_consent      boolean NOT NULL DEFAULT false,
    contact_blocked    boolean NOT NULL DEFAULT false,
    clock_stopped      boolean NOT NULL DEFAULT false,
    registered_at      timestamptz NOT NULL,
    last_activity_at   timestamptz,
    t3_sent_at         timestamptz,
    t7_sent_at         timestamptz,
    version            bigint NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    created_by         text NOT NULL,
    updated_by         text NOT NULL
);
CREATE INDEX leads_territory_status_idx ON leads (territory, status);
CREATE INDEX leads_owner_idx ON leads (owner_user_id);
CREATE INDEX leads_collaborators_idx ON leads USING gin (collaborators);
CREATE INDEX leads_registered_at_idx ON leads (registered_at);
CREATE INDEX leads_email_hash_idx ON leads (email_hash) WHERE email_hash IS NOT NULL;
CREATE INDEX leads_pii_key_idx ON leads (pii_key_id);
-- One live lead per contact email and territory (duplicate-contact).
CREATE UNIQUE INDEX leads_email_unique ON leads (territory, email_hash)
    WHERE email_hash IS NOT NULL AND status <> 'DELETED';

CREATE TABLE lead_activities (
    id             uuid PRIMARY KEY,
    lead_id        uuid NOT NULL REFERENCES leads (id),
    activity_type  text NOT NULL CHECK (activity_type IN ('QUALIFIED_CALL', 'MEETING', 'DEMO',
                       'ROI_PRESENTATION', 'SAMPLE_SENT', 'EMAIL', 'CALL', 'ORDER', 'NOTE',
                       'FOLLOW_UP', 'EMAIL_RECEIVED', 'STATUS_CHANGE', 'LEAD_ASSIGNED', 'CREATED')),
    meaningful     boolean NOT NULL,
    description    text CHECK (length(description) <= 4000),
    outcome        text CHECK (length(outcome) <= 64),
    occurred_at    timestamptz NOT NULL,
    user_id        text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lead_activities_lead_idx ON lead_activities (lead_id, occurred_at DESC);
CREATE INDEX lead_activities_occurred_idx ON lead_activities (occurred_at);

CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    actor_user_id  text NOT NULL,
    actor_role     text NOT NULL,
    action         text NOT NULL,
    entity_type    text NOT NULL,
    entity_id      text NOT NULL,
    territory      text,
    -- Field names and non-PII values only.
    details        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_entity_idx ON audit_log (entity_type, entity_id);

-- The outbox row *is* the event. Written in the business transaction; txid
-- lets the listener advance its durable cursor only over finished transactions.
CREATE TABLE outbox (
    position         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         uuid NOT NULL UNIQUE,
    idempotency_key  uuid NOT NULL UNIQUE,
    event_type       text NOT NULL,
    subject          text,
    -- Audience, copied from the lead at write time.
    territory        text NOT NULL,
    owner_user_id    text,
    collaborators    text[] NOT NULL DEFAULT '{}',
    envelope         jsonb NOT NULL,
    txid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_txid_position_idx ON outbox (txid, position);
CREATE INDEX outbox_created_at_idx ON outbox (created_at);

-- Inbox: (consumer, idempotency key) written in the consumer's own transaction.
CREATE TABLE inbox (
    consumer         text NOT NULL,
    idempotency_key  uuid NOT NULL,
    processed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, idempotency_key)
);
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);

-- Durable per-consumer cursor over (txid, position): every row at or below it
-- belongs to a finished transaction, so nothing can appear behind it later.
CREATE TABLE event_cursors (
    consumer    text PRIMARY KEY,
    txid        xid8 NOT NULL DEFAULT '0',
    position    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Projection written by the durable consumer: events per day, territory, owner, type.
CREATE TABLE cockpit_daily_events (
    day            date NOT NULL,
    territory      text NOT NULL,
    owner_user_id  text NOT NULL,
    event_type     text NOT NULL,
    events         bigint NOT NULL,
    PRIMARY KEY (day, territory, owner_user_id, event_type)
);

-- Row-level security: ENABLE + FORCE everywhere.
ALTER TABLE territories ENABLE ROW LEVEL SECURITY;
ALTER TABLE territories FORCE ROW LEVEL SECURITY;
CREATE POLICY territories_read ON territories FOR SELECT USING (app_role() IS NOT NULL);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_read ON users FOR SELECT USING (app_role() IS NOT NULL);
CREATE POLICY users_write ON users FOR ALL
    USING (app_role() IN ('admin', 'system')) WITH CHECK (app_role() IN ('admin', 'system'));

ALTER TABLE leads ENABLE ROW LEVEL SECURITY;
ALTER TABLE leads FORCE ROW LEVEL SECURITY;
CREATE POLICY leads_select ON leads FOR SELECT
    USING (app_can_see(territory, owner_user_id, collaborators));
CREATE POLICY leads_insert ON leads FOR INSERT WITH CHECK (
    app_role() IN ('admin', 'system')
    OR (app_role() = 'manager' AND territory = app_territory())
    OR (app_role() = 'sales' AND territory = app_territory() AND owner_user_id = app_user()));
CREATE POLICY leads_update ON leads FOR UPDATE
    USING (app_can_change(territory, owner_user_id, collaborators))
    WITH CHECK (app_role() IN ('admin', 'system')
        OR (app_role() IN ('manager', 'sales') AND territory = app_territory()));

ALTER TABLE lead_activities ENABLE ROW LEVEL SECURITY;
ALTER TABLE lead_activities FORCE ROW LEVEL SECURITY;
-- Visible and writable exactly when the lead is (the subquery is itself under RLS).
CREATE POLICY activities_select ON lead_activities FOR SELECT
    USING (EXISTS (SELECT 1 FROM leads l WHERE l.id = lead_id));
CREATE POLICY activities_insert ON lead_activities FOR INSERT WITH CHECK (
    app_role() IN ('admin', 'system', 'manager', 'sales')
    AND (user_id = app_user() OR app_role() = 'system')
    AND EXISTS (SELECT 1 FROM leads l WHERE l.id = lead_id
                AND app_can_change(l.territory, l.owner_user_id, l.collaborators)));

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_insert ON audit_log FOR INSERT
    WITH CHECK (app_role() IS NOT NULL AND actor_user_id = app_user() AND actor_role = app_role());
CREATE POLICY audit_read ON audit_log FOR SELECT USING (
    app_role() IN ('admin', 'system')
    OR (app_role() = 'manager' AND territory = app_territory()));

ALTER TABLE outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox FORCE ROW LEVEL SECURITY;
-- Only an identified principal publishes; reading follows the event's audience.
CREATE POLICY outbox_insert ON outbox FOR INSERT
    WITH CHECK (app_role() IN ('admin', 'system', 'manager', 'sales'));
CREATE POLICY outbox_select ON outbox FOR SELECT
    USING (app_can_see(territory, owner_user_id, collaborators));
CREATE POLICY outbox_delete ON outbox FOR DELETE USING (app_role() = 'system');

ALTER TABLE inbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE inbox FORCE ROW LEVEL SECURITY;
CREATE POLICY inbox_system ON inbox FOR ALL
    USING (app_role() = 'system') WITH CHECK (app_role() = 'system');

ALTER TABLE event_cursors ENABLE ROW LEVEL SECURITY;
ALTER TABLE event_cursors FORCE ROW LEVEL SECURITY;
CREATE POLICY cursors_system ON event_cursors FOR ALL
    USING (app_role() = 'system') WITH CHECK (app_role() = 'system');

ALTER TABLE cockpit_daily_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE cockpit_daily_events FORCE ROW LEVEL SECURITY;
CREATE POLICY daily_read ON cockpit_daily_events FOR SELECT
    USING (app_can_see(territory, owner_user_id, '{}'));
CREATE POLICY daily_write ON cockpit_daily_events FOR ALL
    USING (app_role() = 'system') WITH CHECK (app_role() = 'system');
