//! The `kv` binary against a dev cluster (`kv-server dev`, three real
//! processes on 127.0.0.1): its output in each format and its exit codes,
//! the failures included.
//!
//! The cluster runs the `kv-server` binary built beside `kv` (both are built
//! by `cargo test --workspace`).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kv_server() -> PathBuf {
    let kv = Path::new(env!("CARGO_BIN_EXE_kv"));
    let server = kv.with_file_name("kv-server");
    assert!(
        server.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build cairn-kv-server first)",
        server.display()
    );
    server
}

/// Where test ports are drawn from: outside the kernel's ephemeral range, so
/// that no socket bound to port 0 meanwhile (a client's, a node's outgoing
/// endpoint) can take a port between its choice here and the node's bind.
fn port_range() -> (u16, u16) {
    let ephemeral: Option<(u16, u16)> =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
            let mut w = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((w.next()??, w.next()??))
        });
    match ephemeral {
        Some((low, _)) if low >= 12_000 => (10_000, low - 10_000),
        Some((_, high)) if high <= 60_000 => (high + 1, 65_535 - high),
        _ => (20_000, 40_000),
    }
}

/// The first of three consecutive ports on 127.0.0.1 that `free` finds free.
/// The tests of this file run at once: a range handed to one is never
/// handed to another (it may be free now and bound by that test later).
fn free_base(free: impl Fn(u16) -> bool) -> u16 {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let (from, span) = port_range();
    let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let base: u16 = from + (rand::random::<u16>() % (span - 3));
        if handed.iter().all(|h| base.abs_diff(*h) >= 3) && (0..3).all(|i| free(base + i)) {
            handed.push(base);
            return base;
        }
    }
    panic!("no three free ports");
}

/// Three consecutive ports on 127.0.0.1 free for UDP (QUIC) and TCP
/// (snapshot transfers).
fn free_base_port() -> u16 {
    free_base(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok() && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A dev cluster in a temporary folder; stopped (SIGTERM) on drop.
struct Dev {
    dir: tempfile::TempDir,
    child: Child,
    base_port: u16,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Dev {
    fn start() -> Dev {
        Dev::start_with(&[])
    }

    /// A dev cluster started with `extra` arguments to `kv-server dev`.
    fn start_with(extra: &[String]) -> Dev {
        Dev::start_with_env(extra, &[])
    }

    /// A dev cluster started with `extra` arguments and `env` variables
    /// (which its nodes inherit).
    fn start_with_env(extra: &[String], env: &[(&str, &Path)]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("dev.log")).expect("log");
        let base_port = free_base_port();
        let child = Command::new(kv_server())
            .args(["dev", "--no-first-put", "--base-port", &base_port.to_string()])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kv-server dev");
        let dev = Dev { dir, child, base_port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = dev.kv(&["endpoint", "health"]);
            if o.status.success() {
                return dev;
            }
            assert!(
                Instant::now() < deadline,
                "the dev cluster did not come up: {}\n{}",
                text(&o.stderr),
                dev.log_tails()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of `kv-server dev`'s log and of each node's, for a
    /// failure's message.
    fn log_tails(&self) -> String {
        let mut logs = vec![self.dir.path().join("dev.log")];
        logs.extend((1..=3).map(|i| self.dir.path().join("cairn-data").join(format!("node-{i}.log"))));
        let mut out = String::new();
        for p in logs {
            let body = std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({e})"));
            let lines: Vec<&str> = body.lines().collect();
            out.push_str(&format!("--- {} (last 20 lines)\n", p.display()));
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Runs `kv` in the cluster's folder (so it finds the cluster by itself).
    fn kv(&self, args: &[&str]) -> Output {
        self.kv_in(self.dir.path(), args, None)
    }

    fn kv_in(&self, dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kv"));
        c.args(args).current_dir(dir).env_remove("KV_ENDPOINTS").env_remove("KV_TOKEN").env_remove("KV_CACERT");
        match stdin {
            Some(input) => {
                use std::io::Write;
                c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
                let mut child = c.spawn().expect("kv");
                child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
                child.wait_with_output().expect("kv")
            }
            None => c.output().expect("kv"),
        }
    }

    /// `kv` that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.kv(args);
        assert!(o.status.success(), "kv {args:?} failed ({:?}): {}", o.status.code(), text(&o.stderr));
        text(&o.stdout)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn kv_against_a_dev_cluster_in_every_format_with_its_exit_codes() {
    let dev = Dev::start();

    // put and get, plain (piped output is simple lines).
    assert_eq!(dev.ok(&["put", "greeting", "hello"]).trim(), "OK");
    assert_eq!(dev.ok(&["get", "greeting"]).trim(), "hello");
    let o = dev.kv_in(dev.dir.path(), &["put", "from-stdin"], Some("piped value"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(dev.ok(&["get", "from-stdin"]).trim(), "piped value");
    // A serializable read may be stale on a follower; on the leader an
    // acknowledged write is always applied.
    let v = json(&dev.ok(&["endpoint", "status", "--cluster", "-w", "json"]));
    let leader_ep = v["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["role"] == "leader")
        .and_then(|e| e["endpoint"].as_str())
        .expect("a leader")
        .to_string();
    assert_eq!(dev.ok(&["--endpoints", &leader_ep, "get", "from-stdin", "--consistency", "s"]).trim(), "piped value");

    // JSON and table.
    let v = json(&dev.ok(&["get", "greeting", "-w", "json"]));
    assert_eq!(v["kvs"][0]["key"], "greeting");
    assert_eq!(v["kvs"][0]["value"], "hello");
    let rev = v["revision"].as_u64().expect("revision");
    assert!(rev > 0);
    assert!(v["kvs"][0]["mod_revision"].as_u64().expect("mod revision") <= rev);
    assert_eq!(v["kvs"][0]["version"], 1);
    let t = dev.ok(&["get", "greeting", "-w", "table"]);
    assert!(t.lines().next().expect("header").starts_with("KEY"), "{t}");
    assert!(t.contains("hello"), "{t}");
    let v = json(&dev.ok(&["put", "k2", "v2", "-w", "json"]));
    assert_eq!(v["ok"], true);
    let put_rev = v["revision"].as_u64().expect("revision");

    // A transaction from stdin: the comparison holds (k2 was written at put_rev).
    let t = format!("mod(\"k2\") = {put_rev}\n\nput k2 v3 --prev-kv\nget k2\n\nget k2\n");
    let o = dev.kv_in(dev.dir.path(), &["txn", "-w", "json"], Some(&t));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["succeeded"], true, "{v}");
    assert_eq!(v["revision"].as_u64(), Some(put_rev + 1));
    assert_eq!(v["results"][0]["put"]["prev_kv"]["value"], "v2");
    assert_eq!(v["results"][1]["get"]["kv"]["value"], "v3");
    // The same again: the comparison fails now, the other branch runs.
    let o = dev.kv_in(dev.dir.path(), &["txn"], Some(&t));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "FAILURE\nv3\n");
    // A range in JSON carries each key's revisions and the revision read.
    let v = json(&dev.ok(&["get", "k", "--prefix", "-w", "json"]));
    assert!(v["revision"].as_u64().expect("revision") > 0, "{v}");
    assert!(v["kvs"][0]["mod_revision"].as_u64().expect("mod revision") > 0, "{v}");
    // At a past revision: k2 as the put left it, before the transaction.
    assert_eq!(dev.ok(&["get", "k2", "--rev", &put_rev.to_string()]).trim(), "v2");
    let v = json(&dev.ok(&["get", "k", "--prefix", "--rev", &put_rev.to_string(), "-w", "json"]));
    assert_eq!(v["revision"].as_u64(), Some(put_rev), "{v}");
    assert!(v["kvs"].as_array().expect("kvs").iter().any(|kv| kv["key"] == "k2" && kv["value"] == "v2"), "{v}");
    let o = dev.kv(&["get", "k2", "--rev", &(put_rev + 1000).to_string()]);
    assert!(!o.status.success(), "a future revision was read");

    // Watch: from revision 1, the history of a prefix, one JSON object per event;
    // with a command run per event. Stopped by a kill (it runs until Ctrl-C).
    dev.ok(&["put", "watched/a", "1"]);
    dev.ok(&["del", "watched/a"]);
    let marker = dev.dir.path().join("events.txt");
    let script = format!("echo \"$KV_WATCH_TYPE $KV_WATCH_KEY\" >> {}", marker.display());
    let mut w = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["watch", "watched/", "--prefix", "--rev", "1", "-w", "json", "--", "sh", "-c", &script])
        .current_dir(dev.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kv watch");
    std::thread::sleep(Duration::from_millis(2500));
    let _ = w.kill();
    let out = w.wait_with_output().expect("kv watch");
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(json).collect();
    assert_eq!(lines.len(), 2, "{}", text(&out.stdout));
    assert_eq!(lines[0]["type"], "PUT");
    assert_eq!(lines[0]["kv"]["value"], "1");
    assert_eq!(lines[1]["type"], "DELETE");
    assert_eq!(std::fs::read_to_string(&marker).expect("the command ran"), "PUT watched/a\nDELETE watched/a\n");
    dev.ok(&["compact", &lines[1]["revision"].as_u64().expect("revision").to_string()]);

    // Leases: grant, attach, look, revoke.
    let v = json(&dev.ok(&["lease", "grant", "60", "-w", "json"]));
    let id = v["id"].as_u64().expect("lease id").to_string();
    dev.ok(&["put", "svc/one", "addr", "--lease", &id]);
    let v = json(&dev.ok(&["lease", "ttl", &id, "-w", "json"]));
    assert_eq!(v["keys"][0], "svc/one");
    assert!(dev.ok(&["lease", "list"]).lines().any(|l| l.trim() == id));
    dev.ok(&["lease", "keep-alive", &id, "--once"]);
    dev.ok(&["lease", "revoke", &id]);
    assert_eq!(dev.kv(&["get", "svc/one"]).status.code(), Some(1), "the lease's key survived its revocation");
    assert!(!dev.kv(&["put", "svc/two", "x", "--lease", &id]).status.success());
    // A malformed one names its line, exit code 2.
    let o = dev.kv_in(dev.dir.path(), &["txn"], Some("mod(k2) ~ 1\n"));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"), "{}", String::from_utf8_lossy(&o.stderr));

    // Binary keys and values as hex.
    assert_eq!(dev.ok(&["--hex", "put", "00ff", "0a0b"]).trim(), "OK");
    assert_eq!(dev.ok(&["--hex", "get", "00ff"]).trim(), "0a0b");
    let o = dev.kv(&["--hex", "get", "zz"]);
    assert_eq!(o.status.code(), Some(2), "bad hex is a usage error: {}", text(&o.stderr));

    // Ranges: prefix, keys only, limit; delete a prefix.
    for i in 0..5 {
        dev.ok(&["put", &format!("fruit/{i}"), &format!("f{i}")]);
    }
    let lines = dev.ok(&["get", "fruit/", "--prefix"]);
    assert_eq!(lines.lines().count(), 5, "{lines}");
    assert_eq!(lines.lines().next(), Some("fruit/0\tf0"));
    assert_eq!(dev.ok(&["get", "fruit/", "--prefix", "--keys-only", "--limit", "2"]).trim(), "fruit/0\nfruit/1");
    let v = json(&dev.ok(&["get", "fruit/", "--range-end", "fruit/3", "-w", "json"]));
    assert_eq!(v["count"], 3);
    assert_eq!(dev.ok(&["scan", "fruit/", "--end", "fruit0", "--keys-only"]).lines().count(), 5);
    assert_eq!(dev.ok(&["scan", "--keys-only", "--limit", "3"]).lines().count(), 3);
    assert_eq!(dev.ok(&["del", "fruit/", "--prefix"]).trim(), "OK");
    let o = dev.kv(&["get", "fruit/1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("not found"), "{}", text(&o.stderr));

    // Members and endpoints.
    let v = json(&dev.ok(&["member", "list", "-w", "json"]));
    assert_eq!(v["members"].as_array().expect("members").len(), 3);
    let v = json(&dev.ok(&["endpoint", "status", "--cluster", "-w", "json"]));
    let eps = v["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 3);
    assert_eq!(eps.iter().filter(|e| e["role"] == "leader").count(), 1, "{v}");
    let t = dev.ok(&["endpoint", "status", "--cluster", "-w", "table"]);
    assert!(t.starts_with("ID"), "{t}");
    assert_eq!(t.lines().count(), 4, "{t}");
    let v = json(&dev.ok(&["endpoint", "health", "--cluster", "-w", "json"]));
    assert_eq!(v["healthy"], true);
    let leader = eps.iter().find(|e| e["role"] == "leader").expect("leader")["id"].as_u64().expect("id");
    let other = (1..=3).find(|i| *i != leader).expect("other");
    dev.ok(&["move-leader", &other.to_string()]);

    // A short benchmark, as a script reads it.
    let v = json(&dev.ok(&["bench", "put", "--total", "200", "-c", "4", "--conns", "2", "-w", "json"]));
    assert_eq!(v["ops"], 200, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["p99_ms"].as_f64().expect("p99") > 0.0);
    let v = json(&dev.ok(&["bench", "get", "--total", "100", "--keys", "50", "--consistency", "s", "-w", "json"]));
    assert_eq!(v["ops"], 100, "{v}");
    // A timed run: the warm-up is left out of the figures, the rate is over the measured second.
    let v = json(&dev.ok(&["bench", "put", "--duration", "1", "--warmup", "0.5", "-c", "2", "-w", "json"]));
    assert_eq!((v["seconds"].as_f64(), v["warmup_seconds"].as_f64()), (Some(1.0), Some(0.5)), "{v}");
    let ops = v["ops"].as_f64().expect("ops");
    assert!(ops > 0.0 && (v["ops_per_sec"].as_f64().expect("rate") - ops).abs() < 1e-6, "{v}");
    let out = dev.kv(&["bench", "put", "--duration", "1", "--warmup=-1"]);
    assert!(!out.status.success(), "a negative warm-up was taken");
    // An open loop: exactly the 200 puts due in the measured second count,
    // however fast the cluster answers (a closed loop of 4 tasks makes far
    // more) and however late the last answers come.
    let v =
        json(&dev.ok(&["bench", "put", "--rate", "200", "--duration", "1", "--warmup", "0", "-c", "4", "-w", "json"]));
    assert_eq!((v["ops"].as_u64(), v["errors"].as_u64()), (Some(200), Some(0)), "{v}");
    assert_eq!(v["offered_rate"].as_f64(), Some(200.0), "{v}");
    let out = dev.kv(&["bench", "put", "--rate", "0", "--duration", "1"]);
    assert!(!out.status.success(), "a rate of 0 was taken");

    // A snapshot file.
    let file = dev.dir.path().join("backup.snap");
    let v = json(&dev.ok(&["snapshot", "save", file.to_str().expect("path"), "-w", "json"]));
    assert!(v["bytes"].as_u64().expect("bytes") > 0);
    assert!(std::fs::metadata(&file).expect("saved").len() > 0);
    assert_eq!(dev.ok(&["alarm", "list"]).trim(), "no space alarm is raised");

    // Completion scripts.
    assert!(dev.ok(&["completion", "bash"]).contains("_kv"));
    assert!(dev.ok(&["completion", "zsh"]).contains("#compdef kv"));
    assert!(dev.ok(&["completion", "fish"]).contains("complete -c kv"));

    // Failures: an unknown command, a wrong token, no cluster, a dead endpoint.
    let o = dev.kv(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = dev.kv(&["--token", "wrong", "get", "greeting"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("token"), "{}", text(&o.stderr));
    let empty = tempfile::tempdir().expect("tempdir");
    let o = dev.kv_in(empty.path(), &["get", "greeting"], None);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("no dev cluster found"), "{}", text(&o.stderr));
    let ca = dev.dir.path().join("cairn-data/certs/ca.pem");
    // A dead endpoint: exit code 3. A sub-second --timeout bounds each
    // connection attempt too (they take up to 1 s otherwise), and a client
    // that reached no node does not wait to tell one it is leaving: the
    // command gives up well before a second.
    let started = std::time::Instant::now();
    let o = dev.kv_in(
        empty.path(),
        &[
            "--endpoints",
            "127.0.0.1:9",
            "--token",
            "t",
            "--cacert",
            ca.to_str().expect("path"),
            "--timeout",
            "0.2",
            "get",
            "x",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(900), "--timeout 0.2 took {took:?}");
    for bad in ["0", "1e9", "soon"] {
        let o = dev.kv(&["--timeout", bad, "get", "x"]);
        assert_eq!(o.status.code(), Some(2), "--timeout {bad}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("seconds"), "{}", text(&o.stderr));
    }
    let help = dev.ok(&["--help"]);
    assert!(help.contains("Exit codes"), "{help}");
}

/// Each `kv` process tells its node it is leaving before it exits, so its
/// connection's place is free at once: with one client connection allowed
/// per node, commands in a row all get through (a connection left to the
/// node's 2 s idle timeout would refuse the next one for that long).
#[test]
fn a_finished_kv_frees_its_connection_at_once() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("cairn.toml");
    std::fs::write(&path, "[limits]\nclient_connections_max = 1\n").expect("config");
    let dev = Dev::start_with_env(&[], &[("CAIRN_CONFIG", &path)]);
    let node1 = format!("127.0.0.1:{}", dev.base_port);
    for i in 0..5 {
        let o = dev.kv(&["--endpoints", &node1, "--timeout", "1", "endpoint", "status"]);
        assert!(o.status.success(), "status {i} in a row: {}", text(&o.stderr));
    }
}

/// Three consecutive free TCP ports on 127.0.0.1.
fn free_tcp_base_port() -> u16 {
    free_base(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// The body of `GET /metrics` on 127.0.0.1:`port`, or "" if it cannot be read.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `kv-server dev --metrics-base-port P`: each node serves its Prometheus
/// metrics (Raft, and the LSM's memory: cache, tables, filters) at P, P+1, P+2.
#[test]
fn a_dev_cluster_serves_each_nodes_metrics_when_asked() {
    let base = free_tcp_base_port();
    let dev = Dev::start_with(&["--metrics-base-port".into(), base.to_string()]);
    assert_eq!(dev.ok(&["put", "metered", "1"]).trim(), "OK");
    for i in 0..3u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = scrape(base + i);
            let wanted =
                ["cairn_raft_term", "cairn_lsm_cache_bytes", "cairn_lsm_table_memory_bytes", "cairn_lsm_filter_bytes"];
            if wanted.iter().all(|m| body.contains(m)) {
                break;
            }
            assert!(Instant::now() < deadline, "node {}'s metrics lack one of {wanted:?}:\n{body}", i + 1);
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // The node that took the put timed it (a follower that sent the client
    // on to the leader timed its refusal too).
    let timed = (0..3u16)
        .filter(|i| scrape(base + i).contains("cairn_request_seconds{kind=\"write\",quantile=\"0.99\"}"))
        .count();
    assert!(timed >= 1, "no node timed the put");
}
