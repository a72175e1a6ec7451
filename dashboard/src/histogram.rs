//! How a worker reports a histogram in its flat `Stats` map (name → f64), and how `/metrics` reads it back.
//!
//! A histogram `NAME` (in base units, e.g. `rpc_latency_seconds`) is three kinds of keys:
//!
//! | key | value |
//! |---|---|
//! | `NAME_bucket_<le>` | cumulative count of observations ≤ `<le>`; `<le>` is the bound as a decimal number (`0.005`, `0.25`, `1`, `10`) |
//! | `NAME_count` | number of observations (the `+Inf` bucket; required) |
//! | `NAME_sum` | sum of the observed values |
//!
//! For example `rpc_latency_seconds_bucket_0.01 = 42`, `rpc_latency_seconds_bucket_0.1 = 57`,
//! `rpc_latency_seconds_count = 60`, `rpc_latency_seconds_sum = 1.93`, exported as the Prometheus histogram
//! `pomelo_server_rpc_latency_seconds{server_id, server_type}` with `le="0.01"`, `le="0.1"` and `le="+Inf"`.
//! Keys that are not a complete histogram (no `_count`) are ignored rather than exported half-formed. Bucket
//! counts are made monotonic (a worker may read its atomics at slightly different times), and capped by the count.

use std::collections::BTreeMap;

use pomelo_proto::control::Stats;

/// One histogram read back from a worker's stats.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// (upper bound, cumulative count), ascending, without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// Every complete histogram in `stats`, by name.
pub fn decode(stats: &Stats) -> BTreeMap<String, Decoded> {
    let mut raw: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (key, value) in stats {
        let Some((name, le)) = key.rsplit_once("_bucket_") else { continue };
        let Ok(le) = le.parse::<f64>() else { continue };
        if le.is_finite() {
            raw.entry(name).or_default().push((le, *value));
        }
    }
    let mut out = BTreeMap::new();
    for (name, mut buckets) in raw {
        let Some(count) = stats.get(&format!("{name}_count")).copied().filter(|c| c.is_finite()) else { continue };
        let count = count.max(0.0).round() as u64;
        let sum = stats.get(&format!("{name}_sum")).copied().filter(|s| s.is_finite()).unwrap_or(0.0);
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets.dedup_by(|a, b| a.0 == b.0);
        let mut running = 0u64;
        let buckets = buckets
            .into_iter()
            .map(|(le, c)| {
                let c = if c.is_finite() { c.max(0.0).round() as u64 } else { 0 };
                running = running.max(c).min(count);
                (le, running)
            })
            .collect();
        out.insert(name.to_string(), Decoded { buckets, count, sum });
    }
    out
}

/// Whether `key` is part of a histogram in `stats` (so it is not also exported as a plain gauge).
pub fn is_part(key: &str, histograms: &BTreeMap<String, Decoded>) -> bool {
    histograms.keys().any(|name| {
        key.strip_prefix(name.as_str())
            .is_some_and(|rest| rest == "_count" || rest == "_sum" || rest.starts_with("_bucket_"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: &[(&str, f64)]) -> Stats {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn reads_buckets_count_and_sum() {
        let s = stats(&[
            ("rpc_latency_seconds_bucket_0.1", 57.0),
            ("rpc_latency_seconds_bucket_0.01", 42.0),
            ("rpc_latency_seconds_bucket_1", 60.0),
            ("rpc_latency_seconds_count", 60.0),
            ("rpc_latency_seconds_sum", 1.93),
            ("connections", 3.0),
        ]);
        let h = decode(&s);
        assert_eq!(h.len(), 1);
        let d = &h["rpc_latency_seconds"];
        assert_eq!(d.buckets, vec![(0.01, 42), (0.1, 57), (1.0, 60)]);
        assert_eq!((d.count, d.sum), (60, 1.93));
        assert!(is_part("rpc_latency_seconds_bucket_0.1", &h));
        assert!(is_part("rpc_latency_seconds_sum", &h));
        assert!(!is_part("connections", &h));
    }

    #[test]
    fn incomplete_or_odd_input_is_tamed() {
        let no_count = stats(&[("x_seconds_bucket_0.1", 1.0)]);
        assert!(decode(&no_count).is_empty(), "no _count: not a histogram");
        let odd = stats(&[
            ("x_seconds_bucket_0.1", 9.0),
            ("x_seconds_bucket_0.5", 7.0),
            ("x_seconds_bucket_abc", 1.0),
            ("x_seconds_bucket_inf", 1.0),
            ("x_seconds_count", 8.0),
        ]);
        let d = &decode(&odd)["x_seconds"];
        assert_eq!(d.buckets, vec![(0.1, 8), (0.5, 8)], "capped by the count, monotonic, junk bounds dropped");
        assert_eq!(d.sum, 0.0);
    }
}
