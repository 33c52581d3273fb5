//! Tests of loading: sources, precedence, errors, the example file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use protocol::Framing;

use super::*;
use crate::config::size::parse_size;
use crate::config::ByteSize;

fn base() -> Overrides {
    let mut o = Overrides::default();
    o.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
    o.backend.endpoints = vec!["127.0.0.1:9000".to_owned()];
    o
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("65536").unwrap(), 65536);
    assert_eq!(parse_size("64KiB").unwrap(), 65536);
    assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
    assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
    assert!(parse_size("12 parsecs").is_err());
    assert!(parse_size("MiB").is_err());
}

#[test]
fn flags_alone_are_enough() {
    let c = Config::load(None, &base()).unwrap();
    assert_eq!(c.backend.endpoints, vec!["127.0.0.1:9000"]);
    assert_eq!(c.backend.links_per_endpoint, 2);
}

#[test]
fn every_flag_lands_on_its_key() {
    let mut o = base();
    o.listen.wss = vec!["127.0.0.1:8443".parse().unwrap()];
    o.tls.cert = Some("c.pem".into());
    o.tls.key = Some("k.pem".into());
    o.backend.links_per_endpoint = Some(5);
    o.backend.framing = Some(Framing::U32Be);
    o.admin.listen = Some("127.0.0.1:9999".parse().unwrap());
    let c = Config::load(None, &o).unwrap();
    assert_eq!(c.listen.ws, o.listen.ws);
    assert_eq!(c.listen.wss, o.listen.wss);
    assert_eq!(c.tls.cert.as_deref(), Some(std::path::Path::new("c.pem")));
    assert_eq!(c.tls.key.as_deref(), Some(std::path::Path::new("k.pem")));
    assert_eq!(c.backend.endpoints, vec!["127.0.0.1:9000"]);
    assert_eq!(c.backend.links_per_endpoint, 5);
    assert_eq!(c.backend.framing, Framing::U32Be);
    assert_eq!(c.admin.listen, o.admin.listen);
    // Flags not given leave the defaults alone.
    assert_eq!(c.listen.paths, vec!["/ws"]);
}

#[test]
fn set_overrides_any_key() {
    let mut o = base();
    o.set = vec![
        ("session.max_message_size".into(), "\"64KiB\"".into()),
        ("session.ping_interval".into(), "\"5s\"".into()),
        ("backend.links_per_endpoint".into(), "3".into()),
    ];
    let c = Config::load(None, &o).unwrap();
    assert_eq!(c.session.max_message_size, ByteSize(65536));
    assert_eq!(c.session.ping_interval, Duration::from_secs(5));
    assert_eq!(c.backend.links_per_endpoint, 3);
}

#[test]
fn errors_name_the_key() {
    let mut o = base();
    o.set = vec![("session.max_message_size".into(), "\"lots\"".into())];
    let e = Config::load(None, &o).unwrap_err().to_string();
    assert!(e.contains("max_message_size"), "{e}");

    let mut o = base();
    o.backend.endpoints.clear();
    let e = Config::load(None, &o).unwrap_err().to_string();
    assert!(e.contains("backend.endpoints"), "{e}");

    let mut o = base();
    o.set = vec![("session.bogus_key".into(), "1".into())];
    let e = Config::load(None, &o).unwrap_err().to_string();
    assert!(e.contains("bogus_key"), "{e}");

    let mut o = base();
    o.listen.wss = vec!["127.0.0.1:0".parse().unwrap()];
    let e = Config::load(None, &o).unwrap_err().to_string();
    assert!(e.contains("tls.cert"), "{e}");
}

#[test]
fn example_file_is_valid_and_complete() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Parses with every section present and no unknown key.
    let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&text));
    let c: Config = fig.extract().unwrap();
    c.validate().unwrap();
    // Every key of the tree appears in the example file.
    let tree = serde_json_keys(&Config::default());
    for key in tree {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("{leaf} =")) || text.contains(&format!("# {leaf} =")),
            "{key} is not documented in the example file"
        );
    }
}

fn serde_json_keys(c: &Config) -> Vec<String> {
    let v = figment::value::Value::serialize(c).unwrap();
    let mut out = Vec::new();
    fn walk(prefix: &str, v: &figment::value::Value, out: &mut Vec<String>) {
        if let Some(d) = v.as_dict() {
            for (k, v) in d {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.as_dict().is_some() {
                    walk(&key, v, out);
                } else {
                    out.push(key);
                }
            }
        }
    }
    walk("", &v, &mut out);
    out
}

#[test]
fn fleet_settings_are_checked_at_validation() {
    let ok = |f: &dyn Fn(&mut Config)| {
        let mut c = Config::load(None, &base()).unwrap();
        c.fleet.redis_url = Some("redis://127.0.0.1:6379/0".to_owned());
        f(&mut c);
        c.validate()
    };
    assert!(ok(&|_| {}).is_ok());
    let key = |r: Result<(), ConfigError>| match r {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("{other:?}"),
    };
    // TLS to Redis is not built in: refused before start-up, not at it.
    assert_eq!(
        key(ok(
            &|c| c.fleet.redis_url = Some("rediss://10.0.0.5:6380/0".into())
        )),
        "fleet.redis_url"
    );
    assert_eq!(
        key(ok(&|c| c.fleet.redis_url = Some("http://nope".into()))),
        "fleet.redis_url"
    );
    assert_eq!(
        key(ok(
            &|c| c.fleet.handover_timeout = Duration::from_millis(500)
        )),
        "fleet.handover_timeout"
    );
    assert_eq!(
        key(ok(&|c| c.fleet.directory_ttl = Duration::from_secs(1))),
        "fleet.directory_ttl"
    );
    assert_eq!(key(ok(&|c| c.resume.enabled = false)), "fleet.redis_url");
    assert_eq!(
        key(ok(&|c| c.shutdown.close_spread = c.shutdown.drain_timeout)),
        "shutdown.close_spread"
    );
}

/// Regression (fuzzing): these values passed `validate()` (and
/// `--check-config`) but panicked at run time: tokio's semaphore and channel
/// limit (2^61 - 1), `Instant + Duration` overflowing (link heartbeat
/// deadline, hyper's header timer, detach and move deadlines).
#[test]
fn values_that_would_panic_at_run_time_are_refused_naming_the_key() {
    let huge = "\"500000000000years\"";
    let too_many = (crate::config::MAX_PERMITS as u64 + 1).to_string();
    let cases = [
        ("listen.max_sessions", too_many.as_str()),
        ("listen.max_handshakes", too_many.as_str()),
        ("backend.link_queue_frames", too_many.as_str()),
        ("backend.link_queue_bytes", too_many.as_str()),
        ("backend.links_per_endpoint", "1000000000"),
        ("backend.heartbeat_timeout", huge),
        ("session.ping_timeout", huge),
        ("session.ping_interval", huge),
        ("listen.http_header_timeout", huge),
        ("listen.tls_handshake_timeout", huge),
        ("resume.grace", huge),
        ("backend.move_timeout", huge),
        ("backend.reconnect_max", huge),
        ("shutdown.drain_timeout", huge),
        // Just past the bound is refused too.
        ("session.close_timeout", "\"1day 1s\""),
    ];
    for (key, value) in cases {
        let mut o = base();
        o.set = vec![(key.into(), value.into())];
        let e = Config::load(None, &o)
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} validated"))
            .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

/// Every bound is itself a working value: the configuration at every
/// upper bound validates and the runtime can use it.
#[test]
fn the_upper_bounds_themselves_work() {
    let mut o = base();
    for (key, _) in Config::default().durations() {
        o.set.push((key.into(), "\"1day\"".into()));
    }
    // It must stay below the timeout.
    o.set
        .push(("backend.heartbeat_interval".into(), "\"23h\"".into()));
    // So must the close spread stay below the drain.
    o.set
        .push(("shutdown.close_spread".into(), "\"23h\"".into()));
    let max = crate::config::MAX_PERMITS.to_string();
    for key in [
        "listen.max_sessions",
        "listen.max_handshakes",
        "backend.link_queue_frames",
        "backend.link_queue_bytes",
    ] {
        o.set.push((key.into(), max.clone()));
    }
    let links = crate::config::MAX_LINKS_PER_ENDPOINT.to_string();
    o.set.push(("backend.links_per_endpoint".into(), links));
    for key in [
        "session.client_queue_bytes",
        "resume.buffer_bytes",
        "resume.max_detached_bytes",
        "resume.max_detached",
    ] {
        o.set.push((key.into(), i64::MAX.to_string()));
    }
    let c = Config::load(None, &o).unwrap();
    assert_eq!(c.resume.grace, crate::config::MAX_DURATION);
    crate::fuzzing::exercise_config(&c).unwrap();
}
