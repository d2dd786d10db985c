//! A whole transfer between two directories of this machine: the sender and
//! the receiver each on a thread of their own, joined by bounded channels that
//! carry encoded frames, as a network link would. For local restores, tests
//! and the benchmark.

use std::sync::mpsc::{Receiver as ChannelReceiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::driver::{Completed, Source, Staging};
use crate::error::{Error, Result};
use crate::frame::{Frame, Manifest};
use crate::receiver::Receiver;
use crate::sender::{Sender, SenderEvent, SenderStats};

/// Moves `manifest` from `source` into `staging`; returns the completed
/// checkpoint and the sender's counters.
pub fn run_local(
    cfg: &Config,
    source: &mut Source,
    manifest: Manifest,
    staging: &mut Staging,
) -> Result<(Completed, SenderStats)> {
    cfg.validate()?;
    // Frames in flight between the threads: bounded by the window, plus room
    // for the small control frames.
    let depth = cfg.window_chunks_max * 2 + 16;
    let (to_rx, from_tx) = sync_channel::<Vec<u8>>(depth);
    let (to_tx, from_rx) = sync_channel::<Vec<u8>>(depth);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| receive(cfg, staging, from_tx, to_tx));
        let sent = send(cfg, source, manifest, to_rx, from_rx);
        let received = receiver.join().map_err(|_| Error::Failed("the receiver thread panicked".into()))?;
        let stats = sent?;
        let done = received?.ok_or(Error::Failed("the sender completed, the receiver did not".into()))?;
        Ok((done, stats))
    })
}

/// How often the receiving thread looks whether a background persist ended
/// while no frame arrives.
const PERSIST_POLL: Duration = Duration::from_millis(1);

fn decode(bytes: &[u8], body_max: usize) -> Result<Frame> {
    Ok(Frame::decode(bytes, body_max)?.ok_or(Error::Config("a frame did not arrive whole"))?.0)
}

fn send(
    cfg: &Config,
    source: &mut Source,
    manifest: Manifest,
    to_rx: SyncSender<Vec<u8>>,
    from_rx: ChannelReceiver<Vec<u8>>,
) -> Result<SenderStats> {
    let body_max = cfg.frame_body_bytes_max();
    let mut tx = Sender::new(cfg.clone(), manifest, Instant::now());
    loop {
        while let Ok(b) = from_rx.try_recv() {
            tx.handle_frame(decode(&b, body_max)?, Instant::now());
        }
        match tx.poll_event() {
            Some(SenderEvent::Completed) => return Ok(tx.stats()),
            Some(SenderEvent::Failed(why)) => return Err(Error::Failed(why)),
            None => {}
        }
        let mut busy = false;
        while let Some(req) = tx.poll_read(Instant::now()) {
            let data = source.read(&req)?;
            tx.handle_read(req, data);
            busy = true;
        }
        while let Some(f) = tx.poll_frame() {
            let mut bytes = f.to_bytes();
            busy = true;
            loop {
                match to_rx.try_send(bytes) {
                    Ok(()) => break,
                    Err(TrySendError::Full(b)) => {
                        // The link is full: take the receiver's answers meanwhile.
                        bytes = b;
                        if let Ok(back) = from_rx.recv_timeout(Duration::from_millis(1)) {
                            tx.handle_frame(decode(&back, body_max)?, Instant::now());
                        }
                    }
                    Err(TrySendError::Disconnected(_)) => return Err(Error::Failed("the receiver stopped".into())),
                }
            }
        }
        if !busy {
            let wait = tx.poll_timeout().map_or(cfg.stall_timeout, |t| t.saturating_duration_since(Instant::now()));
            match from_rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(b) => tx.handle_frame(decode(&b, body_max)?, Instant::now()),
                Err(RecvTimeoutError::Timeout) => tx.handle_timeout(Instant::now()),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Failed("the receiver stopped".into())),
            }
        }
    }
}

fn receive(
    cfg: &Config,
    staging: &mut Staging,
    from_tx: ChannelReceiver<Vec<u8>>,
    to_tx: SyncSender<Vec<u8>>,
) -> Result<Option<Completed>> {
    let body_max = cfg.frame_body_bytes_max();
    let mut rx = Receiver::new(cfg.clone());
    let mut completed = None;
    // Ends when the sender hangs up (it has seen Done, or failed).
    loop {
        // A background persist's acknowledgements go out as soon as it is
        // done, whether or not a frame comes meanwhile.
        let mut out = Vec::new();
        if staging.persist_pending() {
            match from_tx.recv_timeout(PERSIST_POLL) {
                Ok(b) => rx.handle_frame(decode(&b, body_max)?),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match from_tx.recv() {
                Ok(b) => rx.handle_frame(decode(&b, body_max)?),
                Err(_) => break,
            }
        }
        staging.drive(&mut rx, &mut |f| out.push(f))?;
        for f in out {
            if to_tx.send(f.to_bytes()).is_err() {
                return Ok(completed.or(staging.take_completed()));
            }
        }
        if let Some(c) = staging.take_completed() {
            completed = Some(c);
        }
    }
    Ok(completed)
}
