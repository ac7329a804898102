-- The schema of notifd before consent (user_version 1), exactly as store.rs at
-- d071c13 created it. Tests build an old database from it to check the upgrade.
BEGIN;
CREATE TABLE IF NOT EXISTS subscriptions(
    email TEXT, event TEXT, created_at INTEGER, PRIMARY KEY (email, event));
CREATE INDEX IF NOT EXISTS subscriptions_by_event ON subscriptions(event, email);
CREATE TABLE IF NOT EXISTS notifications(
    id INTEGER PRIMARY KEY, event TEXT NOT NULL, text TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox(
    notification_id INTEGER NOT NULL, email TEXT NOT NULL,
    state TEXT NOT NULL, tries INTEGER NOT NULL DEFAULT 0,
    next_try_at INTEGER NOT NULL, last_error TEXT, updated_at INTEGER NOT NULL,
    PRIMARY KEY (notification_id, email));
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_try_at);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('next_id', 1);
PRAGMA user_version = 1;
COMMIT;
