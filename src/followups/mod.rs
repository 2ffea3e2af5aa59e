//! Follow-up automation (DESIGN.md "Follow-ups"): the T+3/T+7 job that claims due leads and
//! queues their mails, the dispatcher that delivers them with retries, the German templates,
//! signed unsubscribe links, and the endpoints `POST /api/followups/run`, `GET/POST /unsubscribe`.
//!
//! Layers: `templates`, `token`, `pages` are pure; `repo` holds the SQL; `job` and `mailer` are
//! the use cases (callable without HTTP: the scheduler, `freshplan followups run`, tests);
//! `http` is thin.

pub mod clock;
pub mod http;
pub mod job;
pub mod mailer;
pub mod pages;
pub mod repo;
pub mod templates;
pub mod token;
pub mod unsubscribe;

pub use http::{router, FollowupsState};
