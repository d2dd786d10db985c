//! `kv`: the command line of Cairn.

/// `println!` that ends the program quietly when stdout is closed (`kv scan | head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod bench;
mod out;
mod txn;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_kv_client::protocol::{StatusInfo, WriteOp};
use cairn_kv_client::{Client, ClientOptions, Consistency, Error};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use out::{Format, Out};

/// Talk to a Cairn cluster.
///
/// Without --endpoints (or KV_ENDPOINTS), kv looks for a dev cluster started
/// from this folder (`kv-server dev` keeps its endpoints, token and CA in
/// `./cairn-data`).
///
/// Output: a table on a terminal, plain lines when piped, or JSON with
/// `-w json`. Errors go to stderr as one sentence.
///
/// Exit codes: 0 ok; 1 error (refused, not found, may not have applied);
/// 2 bad usage or configuration; 3 cannot reach the cluster; 130 interrupted.
#[derive(Parser, Debug)]
#[command(name = "kv", version, max_term_width = 100)]
struct Cli {
    /// Comma-separated node addresses (host:port).
    #[arg(long, global = true, env = "KV_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Client token (default: the dev cluster's).
    #[arg(long, global = true, env = "KV_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster's CA certificate, PEM (default: the dev cluster's).
    #[arg(long, global = true, env = "KV_CACERT")]
    cacert: Option<PathBuf>,
    /// Where a dev cluster keeps its files.
    #[arg(long, global = true, env = "KV_DEV_DIR", default_value = "cairn-data")]
    dev_dir: PathBuf,
    /// Seconds a command may take, retries included (a decimal, such as 0.5;
    /// one attempt to connect or to get an answer takes at most this long too).
    #[arg(long, global = true, default_value_t = 15.0, value_parser = parse_timeout)]
    timeout: f64,
    /// Output format (default: table on a terminal, simple when piped).
    #[arg(short = 'w', long = "write-out", global = true, value_enum)]
    write_out: Option<Format>,
    /// Keys and values are hex, given and printed (for binary data).
    #[arg(long, global = true)]
    hex: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Cons {
    /// Linearizable: confirmed by the leader (ReadIndex).
    L,
    /// Serializable: this node's applied state, possibly stale.
    S,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set KEY to VALUE (VALUE read from stdin when absent).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Option<String>,
        /// Attach the key to this lease (it is deleted when the lease ends).
        #[arg(long)]
        lease: Option<u64>,
    },
    /// Print the changes of KEY (or of a prefix or range) as they happen,
    /// until Ctrl-C; with `-- COMMAND...`, run it for each event (with
    /// KV_WATCH_TYPE, KV_WATCH_KEY, KV_WATCH_VALUE, KV_WATCH_REVISION set).
    Watch {
        /// The key (the first key with --prefix or --range-end).
        key: String,
        /// Every key that starts with KEY.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
        /// Keys from KEY up to this one (exclusive).
        #[arg(long)]
        range_end: Option<String>,
        /// From this revision on (what the history still holds); default: from now.
        #[arg(long)]
        rev: Option<u64>,
        /// Also print each event's previous value.
        #[arg(long)]
        prev_kv: bool,
        /// Exit after the first change (for scripts that wait for one).
        #[arg(long)]
        once: bool,
        /// A command to run per event.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Drop the history below revision REV (watches cannot start before it).
    Compact {
        /// The oldest revision to keep.
        rev: u64,
    },
    /// Leases: grant, keep-alive, revoke, ttl, list.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// Print the value of KEY, or of a range of keys.
    Get {
        /// The key (the first key with --prefix or --range-end).
        key: String,
        /// Every key that starts with KEY.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
        /// Keys from KEY up to this one (exclusive).
        #[arg(long)]
        range_end: Option<String>,
        /// Most keys printed (0: the node's page bound).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Print only the keys.
        #[arg(long)]
        keys_only: bool,
        /// l: linearizable (default); s: serializable (may be stale).
        #[arg(long, value_enum, default_value = "l")]
        consistency: Cons,
        /// Read the state as it was at this revision (while the history
        /// holds it; 0: now).
        #[arg(long, default_value_t = 0)]
        rev: u64,
    },
    /// Run a transaction: comparisons, then the operations when they all
    /// hold, then the operations otherwise, separated by blank lines (from
    /// --file or stdin). Example: `mod("lock") = 0`, blank line,
    /// `put lock me`, blank line, `get lock`.
    Txn {
        /// Read the transaction from this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Remove KEY (or every key that starts with it).
    Del {
        /// The key.
        key: String,
        /// Every key that starts with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// Print every key (and value) from START on, page by page.
    Scan {
        /// First key.
        #[arg(default_value = "")]
        start: String,
        /// First key not printed.
        #[arg(long)]
        end: Option<String>,
        /// Most keys printed (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Print only the keys.
        #[arg(long)]
        keys_only: bool,
        /// Read the state as it was at this revision (0: now). Every page
        /// is read at the revision of the first, so the keys printed are one
        /// state, whatever writes happen meanwhile.
        #[arg(long, default_value_t = 0)]
        rev: u64,
    },
    /// Members: list, add, promote, remove.
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Hand leadership to node ID.
    MoveLeader {
        /// The node to lead.
        id: u64,
    },
    /// The nodes: status and health.
    Endpoint {
        #[command(subcommand)]
        cmd: EndpointCmd,
    },
    /// Snapshots of the state.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// The space alarm: list or disarm.
    Alarm {
        #[command(subcommand)]
        cmd: AlarmCmd,
    },
    /// A closed-loop load generator against a running cluster.
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCmd {
    /// Grant a lease of TTL seconds; prints its id.
    Grant {
        /// Its time to live, in seconds.
        ttl: u64,
    },
    /// Keep lease ID alive (every third of its TTL) until Ctrl-C.
    KeepAlive {
        /// The lease.
        id: u64,
        /// Once, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke lease ID now: its keys are deleted.
    Revoke {
        /// The lease.
        id: u64,
    },
    /// Lease ID's TTL, time left and keys.
    Ttl {
        /// The lease.
        id: u64,
    },
    /// Every lease.
    List,
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// The members.
    List,
    /// Add node ID, reached by its peers at ADDR (host:port); start it with
    /// `kv-server run --join` first.
    Add {
        /// The new node's id (never one used before).
        id: u64,
        /// Its peer address.
        addr: String,
        /// Add it as a learner (it catches up without voting; promote it after).
        #[arg(long)]
        learner: bool,
    },
    /// Make learner ID a voter (refused until it has caught up).
    Promote {
        /// The learner.
        id: u64,
    },
    /// Remove node ID (its id can never be used again).
    Remove {
        /// The node.
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum EndpointCmd {
    /// Each node's view: role, term, indexes, sizes.
    Status {
        /// Every member, not only the endpoints given.
        #[arg(long)]
        cluster: bool,
        /// Also hash each node's replicated state.
        #[arg(long)]
        hash: bool,
    },
    /// Can the cluster commit now? (commits an empty entry)
    Health {
        /// Also check that every member answers.
        #[arg(long)]
        cluster: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Save a consistent checkpoint of the state to FILE (restore it with
    /// `kv-server restore --snapshot FILE`).
    Save {
        /// The file to write.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AlarmCmd {
    /// Nodes whose space alarm is raised.
    List,
    /// Clear every space alarm (a node still over its quota raises its own again).
    Disarm,
}

/// A failure, with its exit code.
struct Fail {
    code: u8,
    message: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match e {
            Error::Unreachable(_) => 3,
            Error::Config(_) => 2,
            _ => 1,
        };
        Fail { code, message: e.to_string() }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Fail {
    Fail { code, message: message.into() }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    if let Cmd::Completion { shell } = cli.cmd {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "kv", &mut script);
        outln!("{}", String::from_utf8_lossy(&script).trim_end());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(fail(130, "interrupted")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kv: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The endpoints, token and CA: from the flags, else from a dev cluster's folder.
fn client_options(cli: &Cli) -> Result<ClientOptions, Fail> {
    let dev = &cli.dev_dir;
    let no_cluster = |what: &str| {
        fail(
            2,
            format!(
                "no {what} given and no dev cluster found in {} (start one with `kv-server dev`, or pass --endpoints, --token and --cacert)",
                dev.display()
            ),
        )
    };
    let endpoints = if cli.endpoints.is_empty() {
        let s = std::fs::read_to_string(dev.join("endpoints")).map_err(|_| no_cluster("--endpoints"))?;
        s.split([',', '\n']).map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
    } else {
        cli.endpoints.clone()
    };
    let token = match &cli.token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(dev.join("token")).map_err(|_| no_cluster("--token"))?.trim().to_string(),
    };
    let ca_path = cli.cacert.clone().unwrap_or_else(|| dev.join("certs").join("ca.pem"));
    let ca = std::fs::read(&ca_path)
        .map_err(|e| fail(2, format!("cannot read the CA certificate {}: {e}", ca_path.display())))?;
    let mut opts = ClientOptions::new(endpoints, token, ca);
    opts.retry_deadline = Duration::from_secs_f64(cli.timeout);
    opts.connect_timeout = opts.connect_timeout.min(opts.retry_deadline);
    opts.request_timeout = opts.request_timeout.min(opts.retry_deadline);
    Ok(opts)
}

/// `--timeout`: positive seconds, at most a day.
fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t <= 86_400.0 => Ok(t),
        _ => Err(format!("{s:?} is not a number of seconds between 0 and 86400 (such as 0.5 or 15)")),
    }
}

fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let table_default = std::io::stdout().is_terminal();
    let o = Out::new(cli.write_out, table_default, cli.hex);
    let opts = client_options(&cli)?;
    let endpoints = opts.endpoints.clone();
    let client = Client::new(opts.clone())?;
    let r = dispatch(&cli, &o, &client, &opts, &endpoints).await;
    client.close().await;
    r
}

async fn dispatch(cli: &Cli, o: &Out, client: &Client, opts: &ClientOptions, endpoints: &[String]) -> Result<(), Fail> {
    match &cli.cmd {
        Cmd::Put { key, value, lease } => {
            let value = match value {
                Some(v) => o.input(v)?,
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| fail(1, format!("cannot read the value from stdin: {e}")))?;
                    if o.hex { o.input(String::from_utf8_lossy(&buf).trim())? } else { buf }
                }
            };
            let key = o.input(key)?;
            let op = match lease {
                Some(lease) => WriteOp::PutWithLease { key, value, lease: *lease },
                None => WriteOp::Put { key, value },
            };
            let w = client.write_full(vec![op]).await?;
            o.done(w.index, w.revision);
        }
        Cmd::Txn { file } => {
            let text = match file {
                Some(f) => std::fs::read_to_string(f).map_err(|e| fail(2, format!("reading {}: {e}", f.display())))?,
                None => {
                    if std::io::stdin().is_terminal() {
                        eprintln!(
                            "comparisons, a blank line, the operations when they hold, a blank line, the operations \
                             otherwise; end with Ctrl-D"
                        );
                    }
                    let mut t = String::new();
                    std::io::stdin()
                        .read_to_string(&mut t)
                        .map_err(|e| fail(2, format!("reading the transaction from stdin: {e}")))?;
                    t
                }
            };
            let input = |s: &str| o.input(s).map_err(|f| f.message);
            let t = txn::parse(&text, &input).map_err(|e| fail(2, e))?;
            let r = client.txn(t).await?;
            o.txn(&r);
        }
        Cmd::Get { key, prefix, range_end, limit, keys_only, consistency, rev } => {
            let c = if *consistency == Cons::S { Consistency::Serializable } else { Consistency::Linearizable };
            let key = o.input(key)?;
            if !*prefix && range_end.is_none() {
                let (kv, revision) = client.get_kv_at(key.clone(), *rev, c).await?;
                match kv {
                    Some(kv) => o.value(&kv, *keys_only, revision),
                    None => return Err(fail(1, format!("key {} not found", o.show(&key)))),
                }
            } else {
                let end = match range_end {
                    Some(e) => Some(o.input(e)?),
                    None => prefix_end(&key),
                };
                let page = client.scan_at(key, end, *limit, *keys_only, c, *rev).await?;
                o.pairs(&page.pairs, &page.metas, *keys_only, page.more, page.revision);
            }
        }
        Cmd::Del { key, prefix } => {
            let key = o.input(key)?;
            let op = if *prefix {
                match prefix_end(&key) {
                    Some(end) => WriteOp::DeleteRange { start: key, end },
                    None => {
                        return Err(fail(
                            2,
                            "--prefix needs a prefix with a byte below 0xff (an empty one would name every key)",
                        ));
                    }
                }
            } else {
                WriteOp::Delete { key }
            };
            let w = client.write_full(vec![op]).await?;
            o.done(w.index, w.revision);
        }
        Cmd::Scan { start, end, limit, keys_only, rev } => {
            let mut from = o.input(start)?;
            let end = end.as_deref().map(|e| o.input(e)).transpose()?;
            let mut all = Vec::new();
            let mut metas = Vec::new();
            // The first page fixes the revision; the others read that state.
            let mut revision = *rev;
            loop {
                let want = if *limit == 0 { 0 } else { (*limit - all.len() as u64).min(10_000) as u32 };
                let page = client
                    .scan_at(from.clone(), end.clone(), want, *keys_only, Consistency::Linearizable, revision)
                    .await?;
                revision = page.revision;
                let more = page.more;
                if let Some((k, _)) = page.pairs.last() {
                    from = [k.as_slice(), &[0]].concat();
                }
                all.extend(page.pairs);
                metas.extend(page.metas);
                if !more || (*limit > 0 && all.len() as u64 >= *limit) {
                    break;
                }
            }
            o.pairs(&all, &metas, *keys_only, false, revision);
        }
        Cmd::Compact { rev } => {
            let w = client.compact(*rev).await?;
            o.line(
                &format!("compacted below revision {rev}"),
                serde_json::json!({ "compacted": rev, "revision": w.revision }),
            );
        }
        Cmd::Watch { key, prefix, range_end, rev, prev_kv, once, command } => {
            let key = o.input(key)?;
            let mut w = if *prefix {
                cairn_kv_client::WatchOptions::prefix(key)
            } else if let Some(e) = range_end {
                cairn_kv_client::WatchOptions { end: Some(o.input(e)?), ..cairn_kv_client::WatchOptions::key(key) }
            } else {
                cairn_kv_client::WatchOptions::key(key)
            };
            w.start_revision = rev.unwrap_or(0);
            w.prev_kv = *prev_kv;
            let mut rx = client.watch(w);
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::signal::ctrl_c() => return Err(fail(130, "interrupted")),
                };
                let Some(msg) = msg else { return Ok(()) };
                if let cairn_kv_client::WatchMessage::Events { events, .. } = msg? {
                    for e in &events {
                        o.event(e);
                        if let Some((prog, args)) = command.split_first() {
                            let kind =
                                if e.kind == cairn_kv_client::protocol::EventKind::Put { "PUT" } else { "DELETE" };
                            let status = std::process::Command::new(prog)
                                .args(args)
                                .env("KV_WATCH_TYPE", kind)
                                .env("KV_WATCH_KEY", o.show(&e.kv.key))
                                .env("KV_WATCH_VALUE", o.show(&e.kv.value))
                                .env("KV_WATCH_REVISION", e.revision.to_string())
                                .status()
                                .map_err(|err| fail(2, format!("running {prog}: {err}")))?;
                            if !status.success() {
                                eprintln!("kv: {prog} exited with {status}");
                            }
                        }
                    }
                    if *once && !events.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
        Cmd::Lease { cmd } => match cmd {
            LeaseCmd::Grant { ttl } => {
                let id = client.lease_grant(Duration::from_secs(*ttl)).await?;
                o.line(&format!("lease {id} granted with TTL {ttl}s"), serde_json::json!({ "id": id, "ttl": ttl }));
            }
            LeaseCmd::KeepAlive { id, once } => loop {
                let ttl = client.lease_keep_alive(*id).await?;
                o.line(
                    &format!("lease {id} kept alive with TTL {}s", ttl.as_secs()),
                    serde_json::json!({ "id": id, "ttl": ttl.as_secs() }),
                );
                if *once {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = tokio::signal::ctrl_c() => return Err(fail(130, "interrupted")),
                }
            },
            LeaseCmd::Revoke { id } => {
                let w = client.lease_revoke(*id).await?;
                o.line(&format!("lease {id} revoked"), serde_json::json!({ "id": id, "revision": w.revision }));
            }
            LeaseCmd::Ttl { id } => {
                let (ttl, left, keys) = client.lease_time_to_live(*id).await?;
                let shown: Vec<String> = keys.iter().map(|k| o.show(k)).collect();
                let left_s = left.map_or("unknown (ask the leader)".to_string(), |l| format!("{}s", l.as_secs()));
                o.line(
                    &format!("lease {id}: TTL {}s, {left_s} left, keys: {}", ttl.as_secs(), shown.join(", ")),
                    serde_json::json!({ "id": id, "ttl": ttl.as_secs(), "remaining_ms": left.map(|l| l.as_millis() as u64), "keys": shown }),
                );
            }
            LeaseCmd::List => {
                let ids = client.lease_list().await?;
                let text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                o.line(&text.join("\n"), serde_json::json!({ "leases": ids }));
            }
        },
        Cmd::Member { cmd } => {
            let members = match cmd {
                MemberCmd::List => client.members().await?,
                MemberCmd::Add { id, addr, learner } => client.member_add(*id, addr.clone(), *learner).await?,
                MemberCmd::Promote { id } => client.member_promote(*id).await?,
                MemberCmd::Remove { id } => client.member_remove(*id).await?,
            };
            o.members(&members);
        }
        Cmd::MoveLeader { id } => {
            client.transfer_leader(*id).await?;
            o.line(&format!("leadership handed to node {id}"), serde_json::json!({ "leader": id }));
        }
        Cmd::Endpoint { cmd } => {
            let (cluster, hash, health) = match cmd {
                EndpointCmd::Status { cluster, hash } => (*cluster, *hash, false),
                EndpointCmd::Health { cluster } => (*cluster, false, true),
            };
            let addrs: Vec<String> = if cluster {
                client.members().await?.into_iter().map(|m| m.addr).collect()
            } else {
                endpoints.to_vec()
            };
            if health {
                let index = client.health().await?;
                let mut rows = Vec::new();
                let mut down = 0;
                if cluster {
                    for a in &addrs {
                        let ok = client.status_of(a, false).await;
                        down += usize::from(ok.is_err());
                        rows.push((a.clone(), ok.map(|_| ()).map_err(|e| e.to_string())));
                    }
                }
                o.health(index, &rows);
                if down > 0 {
                    return Err(fail(1, format!("{down} of {} members do not answer", addrs.len())));
                }
            } else {
                let mut rows: Vec<(String, Result<StatusInfo, String>)> = Vec::new();
                for a in &addrs {
                    rows.push((a.clone(), client.status_of(a, hash).await.map_err(|e| e.to_string())));
                }
                o.status(&rows);
                if rows.iter().all(|(_, r)| r.is_err()) {
                    return Err(fail(3, "no endpoint answers"));
                }
            }
        }
        Cmd::Snapshot { cmd: SnapshotCmd::Save { file } } => {
            let tmp = file.with_extension("part");
            let mut f =
                std::fs::File::create(&tmp).map_err(|e| fail(1, format!("cannot create {}: {e}", tmp.display())))?;
            let bar = out::bytes_bar(o.format != Format::Json && std::io::stderr().is_terminal());
            let header = client
                .snapshot_save(&mut f, &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .await;
            bar.finish_and_clear();
            let header = match header {
                Ok(h) => h,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            f.sync_all().map_err(|e| fail(1, format!("cannot sync {}: {e}", tmp.display())))?;
            std::fs::rename(&tmp, file).map_err(|e| fail(1, format!("cannot rename to {}: {e}", file.display())))?;
            o.line(
                &format!(
                    "saved the state at index {} (term {}, {} files, {} bytes) to {}",
                    header.index,
                    header.term,
                    header.files.len(),
                    header.total_bytes(),
                    file.display()
                ),
                serde_json::json!({
                    "file": file.display().to_string(), "index": header.index, "term": header.term,
                    "files": header.files.len(), "bytes": header.total_bytes()
                }),
            );
        }
        Cmd::Alarm { cmd } => match cmd {
            AlarmCmd::List => {
                let s = client.status(false).await?;
                o.alarms(&s.alarms);
            }
            AlarmCmd::Disarm => {
                client.alarm(0, false).await?;
                o.line("space alarms cleared", serde_json::json!({ "cleared": true }));
            }
        },
        Cmd::Bench(args) => bench::run(args, opts, o).await?,
        Cmd::Completion { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}
