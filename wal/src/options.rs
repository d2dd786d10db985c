//! Options, kinds and batches.

use std::ops::Range;
use std::time::Duration;

use crate::format::{PAYLOAD_BYTES_MAX, kind};

/// How `open` treats damage it finds (see `docs/design/wal.md`, "Recovery").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Any damage anywhere is an error.
    Strict,
    /// Damage in the last segment after which no valid record follows is a torn
    /// write from a crash: it is zeroed, the bytes dropped are reported, and the
    /// log opens. Damage anywhere else is an error naming the file and offset.
    #[default]
    TolerateTornTail,
    /// Stop at the first damage wherever it is, never skip a hole, and report
    /// what was not read. A log that stopped early opens read-only.
    PointInTime,
}

/// How the next segment is made ready before a cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preparation {
    /// A background thread writes the next segment full of zeros and syncs it,
    /// so appends overwrite allocated blocks and each fdatasync writes only data
    /// (the fastest choice measured on this project's disks; see docs/benchmarks.md).
    #[default]
    ZeroFill,
    /// The next segment is an empty file that grows with each append.
    Grow,
}

/// Which thread prepares the next segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrepareIn {
    /// A background thread keeps the next segment ready, off the append path.
    #[default]
    Background,
    /// The group-commit leader prepares it at the cut: slower cuts, but every
    /// file-system call happens on the caller's thread, in a deterministic
    /// order (for simulation tests).
    Foreground,
}

/// A place where the log makes something durable. Each is needed: the crash
/// tests show that skipping any one of them can lose acknowledged records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncSite {
    /// fdatasync of the active segment at the end of a group commit.
    AppendData,
    /// fdatasync of the old segment before a cut.
    CutOldSegment,
    /// fdatasync of a new segment's header before it is renamed into place.
    NewSegmentHeader,
    /// fsync of the directory after a new segment is renamed into place.
    DirAfterRename,
    /// fsync of the parent directory after `create` made the log directory.
    DirAfterCreate,
}

impl SyncSite {
    /// Every site, for tests.
    pub const ALL: [SyncSite; 5] = [
        SyncSite::AppendData,
        SyncSite::CutOldSegment,
        SyncSite::NewSegmentHeader,
        SyncSite::DirAfterRename,
        SyncSite::DirAfterCreate,
    ];
}

/// Options of a log. Every bound is here, with its unit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WalOptions {
    /// A segment is cut before a record would take it past this size
    /// (a single larger record still goes into a segment of its own). Default 64 MiB.
    pub segment_bytes_max: u64,
    /// The largest payload of one record. Default 32 MiB.
    pub record_bytes_max: u64,
    /// Bytes of encoded records that may wait for the next group commit;
    /// appenders block beyond it (backpressure). Default 64 MiB.
    pub pending_bytes_max: u64,
    /// How damage is treated when the log is opened.
    pub recovery: RecoveryMode,
    /// How the next segment is prepared.
    pub preparation: Preparation,
    /// Which thread prepares it.
    pub prepare_in: PrepareIn,
    /// Released segments kept (renamed `{seq}.wal.spare`) to be recycled as new
    /// segments instead of preparing new files; 0 turns recycling off. Default 2.
    pub spare_segments_max: usize,
    /// The longest a group-commit leader waits for as many writers as joined the
    /// previous group to join its group (a lone writer never waits). Zero turns
    /// it off. Default 100 µs.
    pub group_commit_wait: Duration,
    /// An fsync slower than this logs a warning. Default 1 s.
    pub slow_sync_warning: Duration,
    /// Test-only: pretend this sync succeeded without doing it, to show that the
    /// crash tests fail when any one sync is missing.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub skip_sync_for_tests: Option<SyncSite>,
    /// Test-only: a new segment's header leaves out the latest snapshot
    /// marker, to show that the tests fail when a release loses it.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub skip_marker_repeat_for_tests: bool,
}

impl WalOptions {
    /// Whether a new segment's header repeats the latest snapshot marker
    /// (always, but for the test switch).
    pub(crate) fn repeats_marker(&self) -> bool {
        #[cfg(feature = "sim")]
        {
            !self.skip_marker_repeat_for_tests
        }
        #[cfg(not(feature = "sim"))]
        {
            true
        }
    }
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 32 << 20,
            pending_bytes_max: 64 << 20,
            recovery: RecoveryMode::TolerateTornTail,
            preparation: Preparation::ZeroFill,
            prepare_in: PrepareIn::Background,
            spare_segments_max: 2,
            group_commit_wait: Duration::from_micros(100),
            slow_sync_warning: Duration::from_secs(1),
            #[cfg(feature = "sim")]
            skip_sync_for_tests: None,
            #[cfg(feature = "sim")]
            skip_marker_repeat_for_tests: false,
        }
    }
}

/// A user record kind: `0..=UserKind::MAX`. The log stores it next to each record
/// and gives it back; what it means belongs to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserKind(u16);

impl UserKind {
    /// The largest user kind.
    pub const MAX: u16 = u16::MAX - kind::USER_BASE;

    /// A user kind; panics (at compile time in a `const`) above [`UserKind::MAX`].
    pub const fn new(k: u16) -> Self {
        assert!(k <= Self::MAX, "user kind out of range");
        UserKind(k)
    }

    /// A user kind, or `None` above [`UserKind::MAX`].
    pub const fn try_new(k: u16) -> Option<Self> {
        if k <= Self::MAX { Some(UserKind(k)) } else { None }
    }

    /// The number.
    pub const fn get(self) -> u16 {
        self.0
    }

    pub(crate) const fn stored(self) -> u16 {
        self.0 + kind::USER_BASE
    }

    pub(crate) const fn from_stored(k: u16) -> Self {
        UserKind(k - kind::USER_BASE)
    }
}

/// Where a user record's position comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pos {
    /// Given by the caller.
    At(u64),
    /// One above the previous record's position, assigned by the log.
    Next,
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    User { kind: UserKind, pos: Pos, payload: Range<usize> },
    State { payload: Range<usize> },
    Marker { position: u64, payload: Range<usize> },
    Truncate { position: u64 },
}

/// Records to append together: one group commit, one fdatasync, in this order.
///
/// Each record is framed on its own, so a crash during the append may keep a
/// prefix of the batch; a caller that needs all-or-nothing puts it in one record.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub(crate) buf: Vec<u8>,
    pub(crate) ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    fn push_payload(&mut self, payload: &[u8]) -> Range<usize> {
        let start = self.buf.len();
        self.buf.extend_from_slice(payload);
        start..self.buf.len()
    }

    /// Adds a user record at `position`, which must be above every position
    /// accepted before it (see [`crate::Wal`]).
    pub fn append(&mut self, kind: UserKind, position: u64, payload: &[u8]) -> &mut Self {
        let payload = self.push_payload(payload);
        self.ops.push(Op::User { kind, pos: Pos::At(position), payload });
        self
    }

    /// Adds a user record whose position the log assigns: one above the previous one
    /// (0 for the first record of an empty log).
    pub fn append_next(&mut self, kind: UserKind, payload: &[u8]) -> &mut Self {
        let payload = self.push_payload(payload);
        self.ops.push(Op::User { kind, pos: Pos::Next, payload });
        self
    }

    /// Sets the state record (the latest one wins; for Raft, the hard state).
    pub fn set_state(&mut self, state: &[u8]) -> &mut Self {
        let payload = self.push_payload(state);
        self.ops.push(Op::State { payload });
        self
    }

    /// Adds a snapshot marker at `position` with a payload (for Raft, the term).
    pub fn snapshot_marker(&mut self, position: u64, payload: &[u8]) -> &mut Self {
        let payload = self.push_payload(payload);
        self.ops.push(Op::Marker { position, payload });
        self
    }

    /// Drops every record at or above `position` that was accepted before this
    /// point: replay will not return them. Positions from `position` on may then
    /// be written again.
    pub fn truncate_from(&mut self, position: u64) -> &mut Self {
        self.ops.push(Op::Truncate { position });
        self
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Removes everything, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ops.clear();
    }

    pub(crate) fn payload(&self, r: &Range<usize>) -> &[u8] {
        &self.buf[r.clone()]
    }

    /// Checks every payload against `max`.
    pub(crate) fn check_sizes(&self, max: u64) -> crate::Result<()> {
        let max = max.min(PAYLOAD_BYTES_MAX);
        for op in &self.ops {
            let len = match op {
                Op::User { payload, .. } | Op::State { payload } | Op::Marker { payload, .. } => payload.len(),
                Op::Truncate { .. } => 0,
            } as u64;
            if len > max {
                return Err(crate::Error::RecordTooLarge { len, max });
            }
        }
        Ok(())
    }
}

/// Whether a write waits for an fdatasync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Return once the records are durable (they share an fdatasync with the
    /// other writes of the same group commit).
    #[default]
    Sync,
    /// Return once the records are written to the file, before any fdatasync:
    /// a crash of the machine (not of the process) may lose them. A later
    /// `Sync` write or [`crate::Wal::sync`] makes them durable.
    Buffered,
}
