//! Configuration: every value that validates is a value that works.
//!
//! The target writes a TOML file setting any key of the configuration
//! tree (found by walking the defaults, so keys added later are fuzzed
//! too) to values of its kind, including absurd ones: durations from 0 to
//! hundreds of billions of years, counts up to `i64::MAX`, sizes in any
//! unit. When the gateway's loading and validation accept the file, the
//! gateway's own `exercise_config` must then build everything the runtime
//! builds from it (settings, semaphores, queues, mailboxes, deadlines,
//! timers, the reconnect backoff) without a panic or an error.
#![no_main]

use std::collections::BTreeMap;

use figment::value::Value;
use gateway::fuzzing::{config_from_toml, exercise_config};
use gateway::Config;
use libfuzzer_sys::fuzz_target;
use wsgw_fuzz::Input;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Duration,
    Number,
    Bool,
    Text,
}

/// Every leaf key of the configuration tree and its kind, from the
/// defaults.
fn keys() -> &'static [(String, Kind)] {
    static KEYS: std::sync::OnceLock<Vec<(String, Kind)>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Kind>) {
            match v {
                Value::Dict(_, d) => {
                    for (k, v) in d {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                Value::Num(..) => {
                    out.insert(prefix.to_owned(), Kind::Number);
                }
                Value::Bool(..) => {
                    out.insert(prefix.to_owned(), Kind::Bool);
                }
                Value::String(_, s) => {
                    let duration = s.starts_with(|c: char| c.is_ascii_digit())
                        && s.contains(|c: char| c.is_ascii_alphabetic());
                    let kind = if duration { Kind::Duration } else { Kind::Text };
                    out.insert(prefix.to_owned(), kind);
                }
                _ => {}
            }
        }
        let mut out = BTreeMap::new();
        let tree = Value::serialize(Config::default()).expect("defaults serialize");
        walk("", &tree, &mut out);
        out.into_iter().collect()
    })
}

fn duration(input: &mut Input) -> String {
    const UNITS: [&str; 9] = ["ns", "ms", "s", "m", "h", "d", "w", "months", "years"];
    let n = match input.u8() % 4 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u32()),
        2 => input.u64() >> (input.u8() % 64),
        _ => 86_400,
    };
    let unit = UNITS[usize::from(input.u8()) % UNITS.len()];
    format!("\"{n}{unit}\"")
}

fn number(input: &mut Input) -> String {
    const TOKIO_MAX: u64 = (1 << 61) - 1;
    const UNITS: [&str; 7] = ["B", "KB", "KiB", "MB", "MiB", "GB", "GiB"];
    match input.u8() % 6 {
        0 => input.u8().to_string(),
        1 => input.u32().to_string(),
        2 => (TOKIO_MAX - 2 + u64::from(input.u8() % 4)).to_string(),
        3 => (input.u64() >> 1).to_string(),
        4 => format!(
            "\"{}{}\"",
            input.u32(),
            UNITS[usize::from(input.u8()) % UNITS.len()]
        ),
        _ => format!("\"{}\"", input.u64()),
    }
}

fn text(input: &mut Input) -> String {
    const WORDS: [&str; 6] = ["varint", "u32be", "json", "text", "info", ""];
    match input.u8() % 2 {
        0 => format!("{:?}", WORDS[usize::from(input.u8()) % WORDS.len()]),
        _ => format!("{:?}", String::from_utf8_lossy(input.short())),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut set = BTreeMap::new();
    set.insert("listen.ws".to_owned(), "[\"127.0.0.1:0\"]".to_owned());
    set.insert(
        "backend.endpoints".to_owned(),
        "[\"127.0.0.1:9\"]".to_owned(),
    );
    let keys = keys();
    while !input.is_empty() {
        let (key, kind) = &keys[usize::from(input.u8()) % keys.len()];
        let value = match kind {
            Kind::Duration => duration(&mut input),
            Kind::Number => number(&mut input),
            Kind::Bool => input.bool().to_string(),
            Kind::Text => text(&mut input),
        };
        set.insert(key.clone(), value);
    }
    let file: String = set.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    if let Ok(config) = config_from_toml(&file) {
        if let Err(e) = exercise_config(&config) {
            panic!("validated but unusable: {e}\n{file}");
        }
    }
});
