-- Users are the authority on who a token's `sub` is: a token for an unknown or deactivated user,
-- or whose role or territory disagrees with the row, is refused (src/auth/users.rs).
-- `freshplan users add|set|deactivate|list` manages the rows through the admin database URL.

ALTER TABLE users ADD COLUMN active boolean NOT NULL DEFAULT true;
ALTER TABLE users ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE users ADD CONSTRAINT users_id_usable CHECK (length(id) BETWEEN 1 AND 128);
ALTER TABLE users ADD CONSTRAINT users_name_usable CHECK (length(name) BETWEEN 1 AND 200);
-- Lookups by id use the primary key; the open-stream check reads `id = ANY(…)` the same way.
