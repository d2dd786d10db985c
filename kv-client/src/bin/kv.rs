//! `kv`: a first command-line client for Cairn (put, get, del, scan, status, health).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_kv_client::{Client, ClientOptions, Consistency, Error};
use clap::{Parser, Subcommand};

/// Talk to a Cairn cluster.
///
/// Without --endpoints, kv reads `./cairn-data/endpoints`, `./cairn-data/token`
/// and `./cairn-data/certs/ca.pem`, which `kv-server dev` writes.
///
/// Exit codes: 0 ok, 1 error, 2 bad usage, 3 cannot reach the cluster.
#[derive(Parser, Debug)]
#[command(name = "kv", version)]
struct Cli {
    /// Comma-separated node addresses (host:port).
    #[arg(long, env = "KV_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Client token.
    #[arg(long, env = "KV_TOKEN")]
    token: Option<String>,
    /// The cluster's CA certificate (PEM).
    #[arg(long, env = "KV_CACERT")]
    cacert: Option<PathBuf>,
    /// Where a dev cluster keeps its files.
    #[arg(long, default_value = "cairn-data")]
    data_dir: PathBuf,
    /// Seconds a command may take, retries included.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set KEY to VALUE (read from stdin when absent).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Option<String>,
    },
    /// Print the value of KEY.
    Get {
        /// The key.
        key: String,
        /// Serve from the node's applied state (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Remove KEY.
    Del {
        /// The key.
        key: String,
    },
    /// Print keys and values from START (inclusive) to END (exclusive).
    Scan {
        /// First key.
        #[arg(default_value = "")]
        start: String,
        /// First key not printed.
        #[arg(long)]
        end: Option<String>,
        /// Most pairs.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// The status of every endpoint.
    Status {
        /// Also hash each node's replicated state.
        #[arg(long)]
        hash: bool,
    },
    /// Commit an empty entry: can the cluster make progress?
    Health,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv: {e}");
            match e {
                Error::Unreachable(_) => ExitCode::from(3),
                Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let endpoints = if cli.endpoints.is_empty() {
        let f = cli.data_dir.join("endpoints");
        let s = std::fs::read_to_string(&f)
            .map_err(|e| Error::Config(format!("no --endpoints given and cannot read {}: {e}", f.display())))?;
        s.split([',', '\n']).map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
    } else {
        cli.endpoints.clone()
    };
    let token = match cli.token.clone() {
        Some(t) => t,
        None => {
            let f = cli.data_dir.join("token");
            std::fs::read_to_string(&f)
                .map_err(|e| Error::Config(format!("no --token given and cannot read {}: {e}", f.display())))?
                .trim()
                .to_string()
        }
    };
    let ca_path = cli.cacert.clone().unwrap_or_else(|| cli.data_dir.join("certs").join("ca.pem"));
    let ca = std::fs::read(&ca_path).map_err(|e| Error::Config(format!("reading {}: {e}", ca_path.display())))?;
    let mut opts = ClientOptions::new(endpoints.clone(), token, ca);
    opts.retry_deadline = Duration::from_secs(cli.timeout);
    let client = Client::new(opts)?;
    match cli.cmd {
        Cmd::Put { key, value } => {
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Error::Config(format!("reading the value from stdin: {e}")))?;
                    buf
                }
            };
            client.put(key, value).await?;
            println!("OK");
        }
        Cmd::Get { key, serializable } => {
            let c = if serializable { Consistency::Serializable } else { Consistency::Linearizable };
            match client.get_with(key, c).await?.0 {
                Some(v) => println!("{}", String::from_utf8_lossy(&v)),
                None => {
                    eprintln!("kv: key not found");
                    client.close().await;
                    std::process::exit(1);
                }
            }
        }
        Cmd::Del { key } => {
            client.delete(key).await?;
            println!("OK");
        }
        Cmd::Scan { start, end, limit } => {
            let page = client.scan(start, end.map(String::into_bytes), limit, Consistency::Linearizable).await?;
            for (k, v) in &page.pairs {
                println!("{}\t{}", String::from_utf8_lossy(k), String::from_utf8_lossy(v));
            }
            if page.more {
                eprintln!("kv: more keys follow (raise --limit or scan from after the last key)");
            }
        }
        Cmd::Status { hash } => {
            println!(
                "{:<6} {:<10} {:<22} {:<9} {:>6} {:>9} {:>9} {:>9}",
                "id", "name", "endpoint", "role", "term", "commit", "applied", "leader"
            );
            for ep in &endpoints {
                match client.status_of(ep, hash).await {
                    Ok(s) => {
                        println!(
                            "{:<6} {:<10} {:<22} {:<9} {:>6} {:>9} {:>9} {:>9}",
                            s.node_id, s.name, ep, s.role, s.term, s.commit, s.applied, s.leader_id
                        );
                        if let Some((i, h)) = s.state_hash {
                            println!("       state hash {h:016x} at applied index {i}");
                        }
                    }
                    Err(e) => println!("{:<6} {:<10} {:<22} unreachable: {e}", "?", "?", ep),
                }
            }
        }
        Cmd::Health => {
            let i = client.health().await?;
            println!("healthy: committed an empty entry at index {i}");
        }
    }
    client.close().await;
    Ok(())
}
