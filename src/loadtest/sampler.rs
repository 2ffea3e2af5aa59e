//! Once a second during the run: the service's processed-event counter (all instances), the
//! service's CPU time and resident memory, the machine's busy time and this tool's CPU time —
//! the timeline of the report. Plus the snapshots taken around each phase.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Client;

use super::procfs;
use super::scrape::Scrape;
use super::stats::Clock;

/// One reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tick {
    pub t_us: u64,
    /// `freshplan_events_consumed_total{result="success"}` over every instance (`None` when a
    /// scrape failed).
    pub processed: Option<f64>,
    /// CPU ticks of the service processes.
    pub service_ticks: u64,
    /// Resident memory of the service processes, KiB.
    pub service_rss_kib: u64,
    pub machine_busy: u64,
    pub machine_total: u64,
    pub own_ticks: u64,
}

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    pub service: u64,
    pub postgres: u64,
    pub own: u64,
    pub machine_busy: u64,
    pub machine_total: u64,
}

impl CpuSnapshot {
    /// Reads every counter now.
    pub fn take(pids: &[u32]) -> CpuSnapshot {
        let (machine_busy, machine_total) = procfs::machine_ticks();
        CpuSnapshot {
            service: pids.iter().map(|p| procfs::cpu_ticks(*p)).sum(),
            postgres: procfs::postgres_ticks(),
            own: procfs::cpu_ticks(procfs::own_pid()),
            machine_busy,
            machine_total,
        }
    }
}

/// Scrapes `/q/metrics` of every instance into one [`Scrape`]; `None` when one fails.
pub async fn scrape_all(client: &Client, urls: &[String]) -> Option<Scrape> {
    let mut all = Vec::with_capacity(urls.len());
    for url in urls {
        let r = client.get(format!("{url}/q/metrics")).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        all.push(Scrape::parse(&r.text().await.ok()?));
    }
    Some(Scrape::combine(all))
}

/// Events the instances consumed successfully, from a scrape.
pub fn processed(s: &Scrape) -> f64 {
    s.sum("freshplan_events_consumed_total", |x| {
        x.label("result") == Some("success")
    })
}

/// The per-second readings, taken by a background task until dropped.
pub struct Sampler {
    ticks: Arc<Mutex<Vec<Tick>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts reading every second.
    pub fn start(client: Client, urls: Vec<String>, pids: Vec<u32>, clock: Clock) -> Sampler {
        let ticks: Arc<Mutex<Vec<Tick>>> = Arc::default();
        let task = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let t_us = clock.now_us();
                    let processed = scrape_all(&client, &urls).await.map(|s| processed(&s));
                    let (machine_busy, machine_total) = procfs::machine_ticks();
                    let tick = Tick {
                        t_us,
                        processed,
                        service_ticks: pids.iter().map(|p| procfs::cpu_ticks(*p)).sum(),
                        service_rss_kib: pids.iter().map(|p| procfs::memory_kib(*p).0).sum(),
                        machine_busy,
                        machine_total,
                        own_ticks: procfs::cpu_ticks(procfs::own_pid()),
                    };
                    ticks.lock().unwrap_or_else(|e| e.into_inner()).push(tick);
                }
            })
        };
        Sampler { ticks, task }
    }

    /// The readings so far.
    pub fn ticks(&self) -> Vec<Tick> {
        self.ticks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Highest service RSS (KiB) read between `from_us` and `to_us`.
    pub fn peak_rss_kib(&self, from_us: u64, to_us: u64) -> u64 {
        self.ticks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| t.t_us >= from_us && t.t_us <= to_us)
            .map(|t| t.service_rss_kib)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}
