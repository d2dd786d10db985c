//! `kv bench`: a load generator. C tasks share K connections; each task
//! sends one request, waits for its answer, and sends the next: a closed
//! loop, or with `--rate` an open one, where request n is due at n / rate
//! seconds and its latency counts from then (so a stalled server shows in
//! the latency of every request it delayed, not only of those in flight).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_kv_client::protocol::WriteOp;
use cairn_kv_client::{Client, ClientOptions, Consistency};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;

use crate::out::{Format, Out};
use crate::{Cons, Fail, fail};

/// What the tasks do.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Workload {
    /// Durable puts of random keys.
    Put,
    /// Gets of preloaded keys.
    Get,
    /// Gets and puts of preloaded keys (see --read-percent).
    Mix,
}

/// Settings of a run.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// put, get or mix.
    #[arg(value_enum)]
    workload: Workload,
    /// Concurrent tasks (requests in flight).
    #[arg(short = 'c', long, default_value_t = 16)]
    clients: usize,
    /// Connections the tasks share.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Seconds measured (unless --total is given).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before the measured ones (connections made, caches
    /// warm), not counted; as etcd-bench's `--warmup`. Ignored with --total.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Run this many operations instead of a duration.
    #[arg(long)]
    total: Option<u64>,
    /// Bytes per key.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Keys preloaded for get and mix.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Reads: l linearizable, s serializable.
    #[arg(long, value_enum, default_value = "l")]
    consistency: Cons,
    /// mix: percent of operations that are reads.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: u8,
    /// Offered load in operations per second, all tasks together (open
    /// loop): request n is due n / rate seconds after the start, and its
    /// latency is measured from when it was due. The tasks still bound the
    /// requests in flight; a server slower than the rate shows as a lower
    /// ops/s and growing latencies. Without it, each task sends as soon as
    /// its last answer came (closed loop).
    #[arg(long)]
    rate: Option<f64>,
}

/// The key of preloaded key `i`, `size` bytes.
fn key_of(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("bench-{i:010}").into_bytes();
    k.resize(size.max(16), b'.');
    k
}

struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// The measured window of a timed run: operations begun at or after `from`
/// and ended by `to` count (as etcd-bench counts them); none begins after `to`.
/// With `--rate`, operations due in `[from, to)` count, whenever they end.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

async fn task(client: Client, a: Arc<BenchArgsCopy>, done: Arc<AtomicU64>, window: Option<Window>) -> Tally {
    let mut t = Tally {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        errors: 0,
        first_error: None,
    };
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::from_rng(&mut rand::rng());
    let consistency = if a.consistency == Cons::S { Consistency::Serializable } else { Consistency::Linearizable };
    loop {
        if window.is_some_and(|w| Instant::now() >= w.to) {
            break;
        }
        let n = done.fetch_add(1, Ordering::Relaxed);
        if a.total.is_some_and(|total| n >= total) {
            break;
        }
        let due = a.rate.map(|rate| a.started + Duration::from_secs_f64(n as f64 / rate));
        if let Some(due) = due {
            if window.is_some_and(|w| due >= w.to) {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let read = match a.workload {
            Workload::Put => false,
            Workload::Get => true,
            Workload::Mix => rng.random_range(0..100) < a.read_percent,
        };
        let started = due.unwrap_or_else(Instant::now);
        let r = if read {
            let key = key_of(rng.random_range(0..a.keys.max(1)), a.key_size);
            client.get_with(key, consistency).await.map(|_| ())
        } else {
            let key: Vec<u8> = if a.workload == Workload::Put {
                let mut key = vec![0u8; a.key_size];
                rng.fill(&mut key[..]);
                key
            } else {
                key_of(rng.random_range(0..a.keys.max(1)), a.key_size)
            };
            // Filled a block of the generator at a time, not a call per byte.
            let mut value = vec![0u8; a.value_size];
            rng.fill(&mut value[..]);
            client.put(key, value).await.map(|_| ())
        };
        let ended = Instant::now();
        // Open loop: every request due in the window counts, however late its
        // answer (leaving out the late ones would hide a stall); closed loop:
        // those begun in the window and answered within it.
        let counted = window.is_none_or(|w| started >= w.from && (due.is_some() || ended <= w.to));
        match r {
            Ok(()) if counted => {
                let us = (ended - started).as_micros().clamp(1, 60_000_000) as u64;
                let _ = t.hist.record(us);
            }
            Ok(()) => {}
            Err(e) => {
                if counted {
                    t.errors += 1;
                }
                t.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    t
}

/// What the tasks read of the settings.
struct BenchArgsCopy {
    workload: Workload,
    total: Option<u64>,
    key_size: usize,
    value_size: usize,
    keys: u64,
    consistency: Cons,
    read_percent: u8,
    /// Operations per second offered (open loop), if any.
    rate: Option<f64>,
    /// When the run began: request n is due n / rate seconds after it.
    started: Instant,
}

/// Runs the benchmark and prints its figures.
pub(crate) async fn run(args: &BenchArgs, opts: &ClientOptions, o: &Out) -> Result<(), Fail> {
    if args.clients == 0 || args.conns == 0 {
        return Err(fail(2, "--clients and --conns must be at least 1"));
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && (0.1..=10_000_000.0).contains(&r))) {
        return Err(fail(2, "--rate must be from 0.1 to 10,000,000 operations per second"));
    }
    if !(0.0..=3600.0).contains(&args.warmup) {
        return Err(fail(2, "--warmup must be from 0 to 3600 seconds"));
    }
    let mut clients = Vec::new();
    for _ in 0..args.conns {
        clients.push(Client::new(opts.clone())?);
    }
    let show = o.format != Format::Json && std::io::stderr().is_terminal();
    if args.workload != Workload::Put {
        let bar = crate::out::bytes_bar(false);
        let started = Instant::now();
        let batch = 500u64;
        let value = vec![b'v'; args.value_size];
        let mut i = 0;
        while i < args.keys {
            let ops = (i..(i + batch).min(args.keys))
                .map(|k| WriteOp::Put { key: key_of(k, args.key_size), value: value.clone() })
                .collect();
            clients[0].write(ops).await?;
            i += batch;
            bar.set_position(i);
        }
        if show {
            eprintln!("preloaded {} keys in {:.1} s", args.keys, started.elapsed().as_secs_f64());
        }
    }
    let started = Instant::now();
    let a = Arc::new(BenchArgsCopy {
        workload: args.workload,
        total: args.total,
        key_size: args.key_size,
        value_size: args.value_size,
        keys: args.keys,
        consistency: args.consistency,
        read_percent: args.read_percent,
        rate: args.rate,
        started,
    });
    let done = Arc::new(AtomicU64::new(0));
    let window = args.total.is_none().then(|| {
        let from = started + Duration::from_secs_f64(args.warmup);
        Window { from, to: from + Duration::from_secs(args.duration.max(1)) }
    });
    let mut handles = Vec::new();
    for i in 0..args.clients {
        handles.push(tokio::spawn(task(clients[i % clients.len()].clone(), a.clone(), done.clone(), window)));
    }
    let bar = if show {
        let b = match args.total {
            Some(t) => indicatif::ProgressBar::new(t),
            None => indicatif::ProgressBar::new((args.warmup + args.duration.max(1) as f64).ceil() as u64),
        };
        if let Ok(s) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
            b.set_style(s);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let ticker = {
        let (bar, done, total) = (bar.clone(), done.clone(), args.total);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                match total {
                    Some(t) => bar.set_position(n.min(t)),
                    None => bar.set_position(secs as u64),
                }
                bar.set_message(format!("{:.0} ops/s", n as f64 / secs.max(0.001)));
            }
        })
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let t = h.await.map_err(|e| fail(1, format!("a bench task failed: {e}")))?;
        let _ = hist.add(&t.hist);
        errors += t.errors;
        if first_error.is_none() {
            first_error = t.first_error;
        }
    }
    let elapsed = match window {
        Some(w) => (w.to - w.from).as_secs_f64(),
        None => started.elapsed().as_secs_f64(),
    };
    ticker.abort();
    bar.finish_and_clear();
    for c in &clients {
        c.close().await;
    }
    let ops = hist.len();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let rate = ops as f64 / elapsed.max(1e-9);
    let what = match args.workload {
        Workload::Put => "put".to_string(),
        Workload::Get => format!("get ({})", if args.consistency == Cons::S { "serializable" } else { "linearizable" }),
        Workload::Mix => format!("mix ({}% reads)", args.read_percent),
    };
    match o.format {
        Format::Json => outln!(
            "{}",
            json!({
                "workload": what, "clients": args.clients, "conns": args.conns, "key_size": args.key_size,
                "value_size": args.value_size, "seconds": elapsed, "offered_rate": args.rate,
                "warmup_seconds": if window.is_some() { args.warmup } else { 0.0 }, "ops": ops, "ops_per_sec": rate,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "max_ms": hist.max() as f64 / 1000.0, "errors": errors, "first_error": first_error,
            })
        ),
        _ => {
            outln!(
                "{what}: {ops} ops in {elapsed:.2} s with {} tasks over {} connections: {rate:.0} ops/s{}",
                args.clients,
                args.conns,
                args.rate.map(|r| format!(" (offered {r:.0})")).unwrap_or_default()
            );
            outln!(
                "latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                ms(0.5),
                ms(0.99),
                ms(0.999),
                hist.max() as f64 / 1000.0
            );
            outln!("errors: {errors}{}", first_error.map(|e| format!(" (first: {e})")).unwrap_or_default());
        }
    }
    if ops == 0 && errors > 0 {
        return Err(fail(1, "every operation failed"));
    }
    Ok(())
}
