//! With traces exported, the subscriber's level ceiling stays at the request-path spans' level (INFO): the
//! trace!/debug! callsites of h2, hyper and tokio, which run on every request, are then refused by the static level
//! check alone, as they are with tracing off. (Its own test binary: the subscriber is process-global.)

use tracing::level_filters::LevelFilter;

#[tokio::test(flavor = "current_thread")]
async fn exporting_spans_keeps_the_level_ceiling_at_info() -> anyhow::Result<()> {
    let settings = distcache_telemetry::Settings {
        level: Some("warn".to_owned()),
        // Nothing listens there; nothing is exported in this test (the first batch is due after a second).
        otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
        sample_ratio: Some(1.0),
        service: "levels-test".to_owned(),
        ..distcache_telemetry::Settings::default()
    };
    // RUST_LOG would override the level under test.
    assert!(std::env::var_os("RUST_LOG").is_none_or(|v| v.is_empty()), "run without RUST_LOG");
    let _telemetry = distcache_telemetry::init(&settings)?;
    assert_eq!(LevelFilter::current(), LevelFilter::INFO);
    assert!(tracing::enabled!(target: distcache_telemetry::SPANS, tracing::Level::INFO), "spans are made");
    assert!(!tracing::enabled!(target: "h2::proto", tracing::Level::TRACE), "h2's trace callsites are not");
    assert!(!tracing::enabled!(target: "hyper", tracing::Level::DEBUG));
    Ok(())
}
