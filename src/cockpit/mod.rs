//! The Sales Cockpit's read side: the projection the durable consumer keeps
//! (`cockpit_daily_events`) and the per-instance widget cache that events invalidate.

pub mod cache;
pub mod projection;
