//! Output: a table on a terminal, plain lines when piped, JSON on request.

use cairn_kv_client::protocol::{MemberInfo, StatusInfo};
use clap::ValueEnum;
use serde_json::{Value, json};

use crate::{Fail, fail};

/// How results are written.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    /// Plain lines, for scripts and pipes.
    Simple,
    /// One JSON document.
    Json,
    /// Aligned columns with a header.
    Table,
}

/// The writer of one command's results.
pub(crate) struct Out {
    pub(crate) format: Format,
    pub(crate) hex: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Bytes in powers of 1024, for people.
pub(crate) fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Prints rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A progress bar for bytes on stderr (hidden when not wanted).
pub(crate) fn bytes_bar(visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

impl Out {
    /// The writer for `format` (default: a table on a terminal, simple otherwise).
    pub(crate) fn new(format: Option<Format>, terminal: bool, hex: bool) -> Out {
        let format = format.unwrap_or(if terminal { Format::Table } else { Format::Simple });
        Out { format, hex }
    }

    /// A key or value given on the command line.
    pub(crate) fn input(&self, s: &str) -> Result<Vec<u8>, Fail> {
        if self.hex {
            unhex(s).ok_or_else(|| fail(2, format!("`{s}` is not hex (two digits per byte)")))
        } else {
            Ok(s.as_bytes().to_vec())
        }
    }

    /// A key or value to print.
    pub(crate) fn show(&self, b: &[u8]) -> String {
        if self.hex { hex(b) } else { String::from_utf8_lossy(b).into_owned() }
    }

    fn json(&self, v: Value) {
        outln!("{v}");
    }

    /// A write applied at `index`.
    pub(crate) fn done(&self, index: u64, revision: u64) {
        match self.format {
            Format::Json => self.json(json!({ "ok": true, "index": index, "revision": revision })),
            _ => outln!("OK"),
        }
    }

    /// A key-value with its revisions, as JSON.
    fn kv_json(&self, kv: &cairn_kv_client::protocol::KeyValue) -> Value {
        json!({
            "key": self.show(&kv.key),
            "value": self.show(&kv.value),
            "create_revision": kv.meta.create_revision,
            "mod_revision": kv.meta.mod_revision,
            "version": kv.meta.version,
        })
    }

    /// One event of a watch: `PUT key value` (or `DELETE key`), one line.
    pub(crate) fn event(&self, e: &cairn_kv_client::protocol::WatchEvent) {
        use cairn_kv_client::protocol::EventKind;
        let kind = if e.kind == EventKind::Put { "PUT" } else { "DELETE" };
        match self.format {
            Format::Json => self.json(json!({
                "type": kind,
                "revision": e.revision,
                "kv": self.kv_json(&e.kv),
                "prev_kv": e.prev.as_ref().map(|p| self.kv_json(p)),
            })),
            _ => {
                let prev = e.prev.as_ref().map(|p| format!(" (was {})", self.show(&p.value))).unwrap_or_default();
                if e.kind == EventKind::Put {
                    outln!("{kind} {} {}{prev}", self.show(&e.kv.key), self.show(&e.kv.value));
                } else {
                    outln!("{kind} {}{prev}", self.show(&e.kv.key));
                }
            }
        }
    }

    /// What a transaction did.
    pub(crate) fn txn(&self, r: &cairn_kv_client::TxnResult) {
        use cairn_kv_client::protocol::TxnOpResult;
        if self.format == Format::Json {
            let results: Vec<Value> = r
                .results
                .iter()
                .map(|x| match x {
                    TxnOpResult::Put { prev } => {
                        json!({ "put": { "prev_kv": prev.as_ref().map(|p| self.kv_json(p)) } })
                    }
                    TxnOpResult::Delete { deleted, prev } => {
                        json!({ "delete": { "deleted": deleted, "prev_kv": prev.as_ref().map(|p| self.kv_json(p)) } })
                    }
                    TxnOpResult::DeleteRange { deleted } => json!({ "delete_range": { "deleted": deleted } }),
                    TxnOpResult::Get { kv } => json!({ "get": { "kv": kv.as_ref().map(|p| self.kv_json(p)) } }),
                })
                .collect();
            self.json(json!({
                "succeeded": r.succeeded, "index": r.index, "revision": r.revision,
                "replayed": r.replayed, "results": results,
            }));
            return;
        }
        outln!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
        for x in &r.results {
            match x {
                TxnOpResult::Put { prev: Some(p) } => outln!("OK (was {})", self.show(&p.value)),
                TxnOpResult::Put { prev: None } => outln!("OK"),
                TxnOpResult::Delete { deleted, prev: Some(p) } => outln!("{deleted} (was {})", self.show(&p.value)),
                TxnOpResult::Delete { deleted, prev: None } | TxnOpResult::DeleteRange { deleted } => {
                    outln!("{deleted}")
                }
                TxnOpResult::Get { kv: Some(kv) } => outln!("{}", self.show(&kv.value)),
                TxnOpResult::Get { kv: None } => outln!("(absent)"),
            }
        }
        if r.replayed {
            outln!("(a retry of a transaction that had applied: its results are not kept)");
        }
    }

    /// One sentence (or its JSON form).
    pub(crate) fn line(&self, text: &str, v: Value) {
        match self.format {
            Format::Json => self.json(v),
            _ => outln!("{text}"),
        }
    }

    /// The value of one key.
    pub(crate) fn value(&self, kv: &cairn_kv_client::protocol::KeyValue, keys_only: bool, revision: u64) {
        let (key, v) = (&kv.key, &kv.value);
        match self.format {
            Format::Json => {
                let mut one = self.kv_json(kv);
                if keys_only && let Some(m) = one.as_object_mut() {
                    m.remove("value");
                }
                self.json(json!({ "kvs": [one], "revision": revision }))
            }
            Format::Table => table(
                &["KEY", "VALUE", "CREATE", "MOD", "VERSION"],
                &[vec![
                    self.show(key),
                    if keys_only { String::new() } else { self.show(v) },
                    kv.meta.create_revision.to_string(),
                    kv.meta.mod_revision.to_string(),
                    kv.meta.version.to_string(),
                ]],
            ),
            Format::Simple if keys_only => outln!("{}", self.show(key)),
            Format::Simple => outln!("{}", self.show(v)),
        }
    }

    /// Pairs of a range.
    /// Pairs of a range; `metas` (the same length, or empty) adds their revisions to JSON.
    pub(crate) fn pairs(
        &self,
        pairs: &[(Vec<u8>, Vec<u8>)],
        metas: &[cairn_kv_client::protocol::KeyMeta],
        keys_only: bool,
        more: bool,
        revision: u64,
    ) {
        match self.format {
            Format::Json => {
                let kvs: Vec<Value> = pairs
                    .iter()
                    .enumerate()
                    .map(|(i, (k, v))| {
                        let mut one = if keys_only {
                            json!({ "key": self.show(k) })
                        } else {
                            json!({ "key": self.show(k), "value": self.show(v) })
                        };
                        if let (Some(m), Some(obj)) = (metas.get(i), one.as_object_mut()) {
                            obj.insert("create_revision".into(), json!(m.create_revision));
                            obj.insert("mod_revision".into(), json!(m.mod_revision));
                            obj.insert("version".into(), json!(m.version));
                        }
                        one
                    })
                    .collect();
                self.json(json!({ "kvs": kvs, "more": more, "count": pairs.len(), "revision": revision }));
            }
            Format::Table => {
                let rows: Vec<Vec<String>> = pairs
                    .iter()
                    .map(|(k, v)| if keys_only { vec![self.show(k)] } else { vec![self.show(k), self.show(v)] })
                    .collect();
                if keys_only { table(&["KEY"], &rows) } else { table(&["KEY", "VALUE"], &rows) }
            }
            Format::Simple => {
                for (k, v) in pairs {
                    if keys_only {
                        outln!("{}", self.show(k));
                    } else {
                        outln!("{}\t{}", self.show(k), self.show(v));
                    }
                }
            }
        }
        if more && self.format != Format::Json {
            eprintln!("kv: more keys follow (raise --limit, or use `kv scan`)");
        }
    }

    /// The member list.
    pub(crate) fn members(&self, m: &[MemberInfo]) {
        match self.format {
            Format::Json => self.json(json!({
                "members": m.iter().map(|x| json!({ "id": x.id, "addr": x.addr, "learner": x.learner })).collect::<Vec<_>>()
            })),
            Format::Table => table(
                &["ID", "ADDRESS", "LEARNER"],
                &m.iter().map(|x| vec![x.id.to_string(), x.addr.clone(), x.learner.to_string()]).collect::<Vec<_>>(),
            ),
            Format::Simple => {
                for x in m {
                    outln!("{}\t{}\t{}", x.id, x.addr, if x.learner { "learner" } else { "voter" });
                }
            }
        }
    }

    /// Each node's status (or why it did not answer).
    pub(crate) fn status(&self, rows: &[(String, Result<StatusInfo, String>)]) {
        match self.format {
            Format::Json => {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(a, r)| match r {
                        Ok(s) => json!({
                            "endpoint": a, "id": s.node_id, "name": s.name, "role": s.role, "leader": s.leader_id,
                            "term": s.term, "commit": s.commit, "applied": s.applied, "first_index": s.first_index,
                            "last_index": s.last_index, "durable_index": s.durable_index, "wal_bytes": s.wal_bytes,
                            "state_bytes": s.lsm_bytes, "used_bytes": s.used_bytes, "quota_bytes": s.quota_bytes,
                            "alarms": s.alarms, "snapshots_installed": s.snapshots_installed, "deltas_installed": s.deltas_installed,
                            "snapshots_sent": s.snapshots_sent,
                            "state_hash": s.state_hash.map(|(i, h)| json!({ "applied": i, "hash": format!("{h:016x}") })),
                        }),
                        Err(e) => json!({ "endpoint": a, "error": e }),
                    })
                    .collect();
                self.json(json!({ "endpoints": v }));
            }
            _ => {
                let mut out = Vec::new();
                for (a, r) in rows {
                    out.push(match r {
                        Ok(s) => {
                            let mut row = vec![
                                s.node_id.to_string(),
                                s.name.clone(),
                                a.clone(),
                                if s.role == "leader" { "yes".into() } else { "no".into() },
                                if s.role == "learner" { "yes".into() } else { "no".into() },
                                s.term.to_string(),
                                s.commit.to_string(),
                                s.applied.to_string(),
                                human(s.wal_bytes),
                                human(s.lsm_bytes),
                            ];
                            if let Some((i, h)) = s.state_hash {
                                row.push(format!("{h:016x}@{i}"));
                            }
                            row
                        }
                        Err(e) => vec!["?".into(), "?".into(), a.clone(), format!("unreachable: {e}")],
                    });
                }
                if self.format == Format::Table {
                    let w = out.iter().map(Vec::len).max().unwrap_or(0);
                    for r in &mut out {
                        r.resize(w.max(10), String::new());
                    }
                    let mut h = vec![
                        "ID", "NAME", "ENDPOINT", "LEADER", "LEARNER", "TERM", "COMMIT", "APPLIED", "LOG", "STATE",
                    ];
                    if w > 10 {
                        h.push("STATE HASH@APPLIED");
                    }
                    table(&h, &out);
                } else {
                    for r in out {
                        outln!("{}", r.join("\t"));
                    }
                }
            }
        }
    }

    /// The health check's outcome.
    pub(crate) fn health(&self, index: u64, rows: &[(String, Result<(), String>)]) {
        match self.format {
            Format::Json => self.json(json!({
                "healthy": rows.iter().all(|(_, r)| r.is_ok()), "committed_index": index,
                "members": rows.iter().map(|(a, r)| json!({ "endpoint": a, "ok": r.is_ok(), "error": r.as_ref().err() })).collect::<Vec<_>>(),
            })),
            _ => {
                outln!("the cluster commits: an empty entry applied at index {index}");
                for (a, r) in rows {
                    match r {
                        Ok(()) => outln!("{a} is healthy"),
                        Err(e) => outln!("{a} is unhealthy: {e}"),
                    }
                }
            }
        }
    }

    /// Raised space alarms.
    pub(crate) fn alarms(&self, a: &[u64]) {
        match self.format {
            Format::Json => self.json(json!({ "alarms": a })),
            _ if a.is_empty() => outln!("no space alarm is raised"),
            _ => {
                for n in a {
                    outln!("node {n}: space alarm (only deletes are accepted)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_bad_hex_is_refused() {
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
