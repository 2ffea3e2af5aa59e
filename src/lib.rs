//! FreshPlan Leads: lead management and the Sales Cockpit on PostgreSQL.
//!
//! One folder per bounded context (`leads`, `events`, `pii`), shared plumbing beside them
//! (`app`, `config`, `db`, `auth`, `error`, `telemetry`). `main.rs` is the thin command line.

pub mod app;
pub mod auth;
pub mod cockpit;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
pub mod events;
pub mod followups;
pub mod html;
pub mod http_security;
pub mod http_server;
pub mod identity;
pub mod leads;
pub mod loadtest;
pub mod pii;
pub mod schedule;
pub mod telemetry;
pub mod territory;
