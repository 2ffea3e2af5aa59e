//! CI smoke run of `freshplan loadtest` (issue 12): the load tool's library entry point against
//! an instance started in-process on a fresh database — 15 s at 200 events/s over nine load
//! users, with six SSE subscribers, two widget readers and a short floor phase before and after.
//! The instance runs the relay into a `nats-server -js` of the test, and the tool follows its
//! JetStream stream beside the SSE path (`--nats`). It checks delivery and correctness only:
//! zero lost, zero duplicated on the SSE streams and in the stream, every command answered with
//! success. Timings are benchmark goals (README "Performance"), never asserted here.

mod common;

use std::time::Duration;

use common::nats::Nats;
use common::*;
use freshplan::loadtest::report::PhaseKind;
use freshplan::loadtest::setup::Database;
use freshplan::loadtest::{self, Options, Shape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_seconds_at_200_events_per_second_lose_and_duplicate_nothing_on_the_sse_streams_or_in_the_relays_jetstream_stream(
) {
    let nats = Nats::start().await;
    let app = TestApp::spawn_with(&[
        ("FRESHPLAN_RELAY_ENABLED", "true"),
        ("FRESHPLAN_RELAY_NATS_URL", &nats.url()),
    ])
    .await;
    let settings = app.db.settings(&[]);
    let database = Database {
        admin_url: admin_url(),
        name: app.db.name.clone(),
        owner_role: settings.owner_role.clone(),
    };
    let mut opts = Options::new(
        vec![app.url.clone()],
        Shape::Fixed {
            rate: 200.0,
            duration: Duration::from_secs(15),
        },
        settings.jwt.clone(),
        database,
    );
    opts.users = 9;
    opts.subscribers = 6;
    opts.widget_readers = 2;
    opts.leads_per_user = 3;
    opts.baseline = true;
    opts.floor = Duration::from_secs(2);
    opts.drain = Duration::from_secs(10);
    opts.nats = Some(nats.url());

    let report = loadtest::run(opts).await.expect("the load test runs");
    let s = &report.summary;

    assert_eq!(s.sent, 3000, "200/s for 15 s, open loop");
    assert_eq!(
        s.failed,
        0,
        "every command succeeded: {:?}",
        report
            .phases
            .iter()
            .filter_map(|p| p.service.as_ref())
            .flat_map(|p| p.failures.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.committed_events, 3000,
        "one event per command, read back from the outbox"
    );
    assert!(
        s.expected_deliveries >= 2 * 3000,
        "the admin and a manager receive every event ({} expected deliveries)",
        s.expected_deliveries
    );
    assert_eq!(
        s.lost,
        0,
        "lost: {:?}",
        report
            .phases
            .iter()
            .filter_map(|p| p.service.as_ref())
            .flat_map(|p| p.lost_examples.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(s.duplicates, 0, "no subscriber got an event twice");
    assert_eq!(s.resyncs, 0, "no subscriber fell behind");
    assert!(
        report
            .phases
            .iter()
            .filter_map(|p| p.service.as_ref())
            .all(|p| p.unmatched_writes == 0),
        "every answered write's position is a committed event"
    );
    assert_eq!(
        s.end_to_end.count,
        report
            .phases
            .iter()
            .filter_map(|p| p.service.as_ref())
            .map(|p| p.delivered)
            .sum::<u64>(),
        "an end to end sample per delivery of the tool's own events"
    );
    let floors: Vec<_> = report
        .phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Floor)
        .filter_map(|p| p.floor.as_ref())
        .collect();
    assert_eq!(floors.len(), 2, "a floor phase before and after");
    assert!(
        floors
            .iter()
            .all(|f| f.failed == 0 && f.notified == f.committed),
        "every floor write committed and its notification arrived"
    );
    assert!(
        s.widget_client.count > 0,
        "the widget readers were answered"
    );

    let relay = s.relay.as_ref().expect("the relay's stream was followed");
    assert_eq!(
        (relay.committed_events, relay.in_stream),
        (3000, 3000),
        "every committed event reached the JetStream stream: {:?}",
        relay.lost_examples
    );
    assert_eq!(relay.duplicates, 0, "no event twice in the stream");
    assert_eq!(
        relay.end_to_end.count, 3000,
        "an end to end sample per command's event in the stream"
    );

    let dir = tempfile::tempdir().unwrap();
    loadtest::report::write(&report, dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["summary"]["lost"], 0);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(
        html.contains("<svg")
            && !html.contains("<script")
            && html.contains("Relay into NATS JetStream"),
        "self-contained charts, the relay beside the SSE path"
    );
}
