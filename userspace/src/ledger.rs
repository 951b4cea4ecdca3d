//! The durable usage ledger: a SQLite file with one `usage` row per
//! committed request.
//!
//! # Interface
//!
//! ```text
//! let ledger = Ledger::open(&cfg.budget.ledger)?;          // creates file + schema
//! ledger::rebuild(&cfg.budget.ledger.path, &budget, now)?;  // before serving
//! ledger.record(UsageRecord { .. });   // per request, after budget.commit; never blocks on disk
//! ledger.close()?;                     // clean stop: everything recorded is on disk
//! ledger::usage_report(path, from, to)? + format_usage_table(&rows)   // `kedge usage`
//! ```
//!
//! # Durability
//!
//! `record` queues the row for a dedicated writer thread, which writes every
//! row queued within one group-commit window (`group_commit_ms`, default 20)
//! in a single transaction (WAL, `synchronous = FULL`). A row is therefore on
//! disk at most one window plus one transaction after `record` returned; a
//! process killed outright loses at most that. `flush` writes what is queued
//! at once and waits; `close` (and `Drop`) flush before the thread ends. A
//! failed write (disk full, …) is logged, kept and retried every window.
//!
//! # Format
//!
//! A window's rows are stored as `usage_batch` rows of up to 64 requests
//! each (their JSON); the `usage` view shows them one row per
//! request with the columns a table would have (`sqlite3 ledger.sqlite
//! 'SELECT * FROM usage'`). A ledger written by an older kedge (a `usage`
//! table) is migrated on open, once, in one transaction. An older kedge
//! cannot open a migrated ledger (it fails on start, changing nothing).
//!
//! # Rollups
//!
//! Next to the batches the writer keeps `usage_minute` and `usage_hour`:
//! one row per tenant, API key, backend and Unix minute (hour) with the
//! requests, tokens, cost and latest start, updated in the same transaction
//! as the rows they sum, so a crash leaves all three consistent. [`rebuild`]
//! reads hours, minutes where the plan's grain or a calendar cut needs them,
//! and raw rows only for the last minute (and a minute a cut splits): its
//! cost follows the month's hours and keys, not its requests, and the result
//! is the one a GROUP BY over every row gives. `usage_rollup_state` holds the
//! last batch summed: a ledger from before the rollups (or batches written
//! by anything else) is rolled up once on open. The rollups also keep the
//! route and the token kinds, so `kedge usage` reads them the same way: a
//! month's report costs what its hours cost.
//!
//! SQLite is built from source (`rusqlite`'s `bundled`): a few seconds of C
//! compile once buys the same SQLite on every host and CI without a system
//! library or header to install.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, LazyLock, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, params};
use serde::Deserialize;
use toml::Spanned;

use crate::budget::{Budget, BudgetConfigError, RestorePlan, RestoredUsage, Usage, format_dollars};

/// `[budget.ledger]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The SQLite file (created with its directory if missing).
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Rows queued within this many milliseconds share one transaction.
    #[serde(default = "default_window")]
    pub group_commit_ms: Spanned<u64>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            path: default_path(),
            group_commit_ms: default_window(),
        }
    }
}

/// `$STATE_DIRECTORY/ledger.sqlite` (systemd's `StateDirectory=`), else
/// `/var/lib/kedge/ledger.sqlite`.
fn default_path() -> PathBuf {
    let dir = std::env::var_os("STATE_DIRECTORY")
        .and_then(|d| {
            d.to_str()
                .and_then(|d| d.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/kedge"));
    dir.join("ledger.sqlite")
}

fn default_window() -> Spanned<u64> {
    Spanned::new(0..0, 20)
}

/// Longest group-commit window accepted: past it a crash loses too much.
pub const MAX_GROUP_COMMIT_MS: u64 = 10_000;

impl LedgerConfig {
    pub fn window(&self) -> Duration {
        Duration::from_millis(*self.group_commit_ms.get_ref())
    }

    pub(crate) fn validate(&self) -> Vec<BudgetConfigError> {
        let ms = *self.group_commit_ms.get_ref();
        if ms == 0 || ms > MAX_GROUP_COMMIT_MS {
            let span = self.group_commit_ms.span();
            return vec![BudgetConfigError {
                span: (span != (0..0)).then_some(span),
                message: format!("group_commit_ms must be between 1 and {MAX_GROUP_COMMIT_MS}"),
                hint: Some("it bounds what a crash can lose; tens of milliseconds is usual".into()),
            }];
        }
        Vec::new()
    }
}

/// One committed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub request_id: Arc<str>,
    /// Names are shared with the proxy's config (no copy per request).
    pub tenant: Arc<str>,
    /// The API key's id, never the secret.
    pub api_key: Option<Arc<str>>,
    /// The API route, e.g. `/v1/chat/completions`.
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub model: Arc<str>,
    pub usage: Usage,
    /// When the budget reservation was taken: the window the usage belongs to.
    pub started: Timestamp,
    pub finished: Timestamp,
}

/// A request's `usage` columns in [`USAGE_VIEW`]'s order: what a batch
/// stores of it, as a JSON array.
type Columns<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    &'a str,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

impl UsageRecord {
    fn columns(&self) -> Columns<'_> {
        (
            &self.request_id,
            &self.tenant,
            self.api_key.as_deref(),
            &self.route,
            &self.backend,
            &self.model,
            int(self.usage.prompt_tokens),
            int(self.usage.completion_tokens),
            int(self.usage.cached_tokens),
            int(self.usage.cost_micros),
            nanos(self.started),
            nanos(self.finished),
        )
    }

    /// Appends the row as a JSON array of [`Self::columns`]: what serde_json
    /// writes of them, byte for byte (a unit test compares), without its
    /// per-string escape loop, which was a fifth of the ledger writer's work.
    fn write_json(&self, out: &mut Vec<u8>) {
        let (
            request_id,
            tenant,
            api_key,
            route,
            backend,
            model,
            prompt,
            completion,
            cached,
            cost,
            started,
            finished,
        ) = self.columns();
        out.push(b'[');
        for s in [request_id, tenant] {
            json_str(out, s);
            out.push(b',');
        }
        match api_key {
            Some(key) => json_str(out, key),
            None => out.extend_from_slice(b"null"),
        }
        for s in [route, backend, model] {
            out.push(b',');
            json_str(out, s);
        }
        let mut digits = itoa::Buffer::new();
        for n in [prompt, completion, cached, cost, started, finished] {
            out.push(b',');
            out.extend_from_slice(digits.format(n).as_bytes());
        }
        out.push(b']');
    }
}

/// `s` as a JSON string. Ids, names and keys are rarely other than plain
/// ASCII, checked eight bytes at a time; any other is written by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if crate::openai::plain_run(s.as_bytes(), 0) == s.len() {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Rows per `usage_batch` row: a window with more rows writes several
/// batches, and the writer gives the core back after each (see
/// [`write_batch`]). Also the stride of the row ids [`USAGE_VIEW`] numbers
/// rows with.
const ROWS_PER_BATCH: usize = 64;

/// The rows as written: a window's requests in `usage_batch` rows of up to
/// [`ROWS_PER_BATCH`], each a JSON array of arrays in [`USAGE_VIEW`]'s
/// column order. One B-tree insert and one bound value per batch instead of
/// a row, twelve values and an index entry per request: 2 200 instructions
/// a request against 9 400 in a callgrind run of the same rows
/// (`docs/benchmarks.md`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_batch (
    id               INTEGER PRIMARY KEY,
    first_started_ns INTEGER NOT NULL,  -- the earliest started_ns of its rows
    last_started_ns  INTEGER NOT NULL,  -- the latest
    rows             TEXT    NOT NULL   -- JSON: [[request_id, tenant, ...], ...]
);
CREATE INDEX IF NOT EXISTS usage_batch_started ON usage_batch (last_started_ns);
";

/// One row per request, as operators and the readers here query it. `id`
/// orders rows like the writes; `batch` and the batch bounds let a query by
/// start time skip whole batches through `usage_batch_started` (SQLite
/// flattens the view, so a bound on them reaches the index).
static USAGE_VIEW: LazyLock<String> = LazyLock::new(|| {
    format!(
        "CREATE VIEW IF NOT EXISTS usage AS
         SELECT b.id * {ROWS_PER_BATCH} + r.key AS id,
                b.id AS batch,
                b.first_started_ns AS batch_first_started_ns,
                b.last_started_ns AS batch_last_started_ns,
                r.value ->> 0 AS request_id,
                r.value ->> 1 AS tenant,
                r.value ->> 2 AS api_key,
                r.value ->> 3 AS route,
                r.value ->> 4 AS backend,
                r.value ->> 5 AS model,
                r.value ->> 6 AS prompt_tokens,
                r.value ->> 7 AS completion_tokens,
                r.value ->> 8 AS cached_tokens,
                r.value ->> 9 AS cost_micros,
                r.value ->> 10 AS started_ns,   -- Unix time, nanoseconds
                r.value ->> 11 AS finished_ns
         FROM usage_batch AS b, json_each(b.rows) AS r;"
    )
});

/// Rows of `usage` started in `[?from, ?to)` (`?to` may be NULL: no end), as
/// a WHERE clause over the view; the batch bounds come first so whole
/// batches outside the period are skipped by the index.
fn started_within(from: &str, to: &str) -> String {
    format!(
        "batch_last_started_ns >= {from} AND ({to} IS NULL OR batch_first_started_ns < {to})
         AND started_ns >= {from} AND ({to} IS NULL OR started_ns < {to})"
    )
}

/// Moves the rows of a ledger written by kedge before the batches (a
/// `usage` table, one row per request) into `usage_batch`, in their order,
/// and replaces the table by the view, in one transaction: an interrupted
/// migration leaves the old ledger as it was. The rollups are dropped with
/// the old row ids their watermark refers to, and rebuilt on open.
fn migrate_row_table(conn: &mut Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let batches = tx.execute(
        &format!(
            "INSERT INTO usage_batch (first_started_ns, last_started_ns, rows)
             SELECT MIN(started_ns), MAX(started_ns),
                    json_group_array(json_array(request_id, tenant, api_key, route, backend,
                        model, prompt_tokens, completion_tokens, cached_tokens, cost_micros,
                        started_ns, finished_ns) ORDER BY id)
             FROM usage GROUP BY (id - 1) / {ROWS_PER_BATCH} ORDER BY MIN(id)"
        ),
        [],
    )?;
    tx.execute_batch(
        "DROP TABLE usage; DROP TABLE IF EXISTS usage_rollup_state;
         DROP TABLE IF EXISTS usage_minute; DROP TABLE IF EXISTS usage_hour;",
    )?;
    tx.execute_batch(&USAGE_VIEW)?;
    tx.commit()?;
    tracing::info!(
        batches,
        took_ms = started.elapsed().as_millis() as u64,
        "ledger: per-request rows moved into batches (once, for a ledger written by an older kedge)"
    );
    Ok(())
}

/// Whether `usage` in this ledger is the per-request table of an older kedge.
fn has_row_table(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'usage'",
        [],
        |r| r.get(0),
    )
}

/// The rollups and their watermark: the same sums per minute and per hour.
/// `api_key` is nullable like in `usage`, so the key is not a UNIQUE
/// constraint (SQLite treats NULLs as distinct): the single writer updates,
/// or inserts when nothing matched.
static ROLLUP_SCHEMA: LazyLock<String> = LazyLock::new(|| {
    let mut sql = String::new();
    for Level { table, column, .. } in [MINUTES, HOURS] {
        let _ = write!(
            sql,
            "CREATE TABLE IF NOT EXISTS {table} (
                {column}          INTEGER NOT NULL,  -- Unix time in {column}s, floored
                tenant            TEXT    NOT NULL,
                api_key           TEXT,
                backend           TEXT    NOT NULL,
                route             TEXT    NOT NULL,
                requests          INTEGER NOT NULL,
                prompt_tokens     INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                cached_tokens     INTEGER NOT NULL,
                cost_micros       INTEGER NOT NULL,
                last_started_ns   INTEGER NOT NULL   -- the latest started_ns summed
            );
            CREATE INDEX IF NOT EXISTS {table}_key
                ON {table} ({column}, tenant, backend, route, api_key);\n"
        );
    }
    sql.push_str(
        "CREATE TABLE IF NOT EXISTS usage_rollup_state (
            through_id INTEGER NOT NULL  -- every usage_batch row with id <= this is summed
        );",
    );
    sql
});

/// One rollup table: its name, its bucket column and the bucket's length.
#[derive(Clone, Copy)]
struct Level {
    table: &'static str,
    column: &'static str,
    ns: i64,
}

const MINUTES: Level = Level {
    table: "usage_minute",
    column: "minute",
    ns: 60_000_000_000,
};

const HOURS: Level = Level {
    table: "usage_hour",
    column: "hour",
    ns: 3_600_000_000_000,
};

/// `started_ns`'s Unix minute, floored (SQLite's `/` truncates toward zero).
const MINUTE_OF_STARTED: &str = "(started_ns / 60000000000 - (started_ns % 60000000000 < 0))";

/// Counters of the writer, for `/metrics` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Rows on disk (written by this process).
    pub rows: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Writes that failed and will be retried.
    pub failures: u64,
    /// How long the last transaction took to commit (fsync included).
    pub last_commit: Duration,
}

#[derive(Default)]
struct Counters {
    rows: AtomicU64,
    transactions: AtomicU64,
    failures: AtomicU64,
    last_commit_nanos: AtomicU64,
}

/// What the request path hands the writer thread. A row wakes the writer only
/// when it opens a window (the queue was empty); rows inside the window just
/// queue, so a busy proxy pays one wake-up per window, not one per request.
#[derive(Default)]
struct Queue {
    rows: Vec<UsageRecord>,
    flushes: Vec<mpsc::SyncSender<Result<(), String>>>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer side of the ledger. `Send + Sync`: share it in an `Arc`.
pub struct Ledger {
    shared: Arc<Shared>,
    writer: Option<thread::JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Ledger {
    /// Opens (or creates) the ledger and starts its writer thread.
    pub fn open(config: &LedgerConfig) -> anyhow::Result<Ledger> {
        let conn = open_writer(&config.path)?;
        let shared = Arc::new(Shared::default());
        let counters = Arc::new(Counters::default());
        let window = config.window();
        let (s, c) = (shared.clone(), counters.clone());
        let writer = thread::Builder::new()
            .name("kedge-ledger".into())
            .spawn(move || write_loop(conn, &s, window, &c))
            .context("cannot start the ledger writer thread")?;
        Ok(Ledger {
            shared,
            writer: Some(writer),
            counters,
        })
    }

    /// Queues one row; it is on disk within one group-commit window.
    pub fn record(&self, record: UsageRecord) {
        let mut q = self.shared.lock();
        if q.closed {
            tracing::error!("ledger is closed; a usage row was not recorded");
            return;
        }
        let opens_window = q.rows.is_empty();
        q.rows.push(record);
        drop(q);
        if opens_window {
            self.shared.wake.notify_one();
        }
    }

    /// Writes everything queued so far, now, and waits until it is on disk.
    pub fn flush(&self) -> anyhow::Result<()> {
        let (ack, done) = mpsc::sync_channel(1);
        {
            let mut q = self.shared.lock();
            anyhow::ensure!(!q.closed, "ledger is closed");
            q.flushes.push(ack);
        }
        self.shared.wake.notify_one();
        done.recv()
            .context("ledger writer is gone")?
            .map_err(|e| anyhow::anyhow!("ledger write failed: {e}"))
    }

    /// Flushes and stops the writer: the clean stop, which loses nothing.
    pub fn close(mut self) -> anyhow::Result<()> {
        let flushed = self.flush();
        self.stop();
        flushed
    }

    fn stop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("ledger writer thread panicked");
        }
    }

    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            rows: self.counters.rows.load(Ordering::Relaxed),
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            last_commit: Duration::from_nanos(
                self.counters.last_commit_nanos.load(Ordering::Relaxed),
            ),
        }
    }
}

impl Drop for Ledger {
    /// The writer drains its queue when closed, so a dropped ledger also loses
    /// nothing (unless the process dies first).
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the ledger directory {}", dir.display()))?;
    }
    let mut conn = Connection::open(path)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    if has_row_table(&conn)? {
        migrate_row_table(&mut conn)
            .with_context(|| format!("cannot migrate the ledger {}", path.display()))?;
    }
    conn.execute_batch(SCHEMA)
        .and_then(|()| conn.execute_batch(&USAGE_VIEW))
        .with_context(|| format!("cannot create the ledger schema in {}", path.display()))?;
    catch_up_rollup(&mut conn)
        .with_context(|| format!("cannot roll up the ledger {}", path.display()))?;
    Ok(conn)
}

/// Creates the rollups if missing and sums into them the batches they do not
/// cover yet (all of them for a ledger from before the rollups or just
/// migrated), in one transaction: an interrupted backfill leaves nothing
/// behind and reruns.
fn catch_up_rollup(conn: &mut Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(&ROLLUP_SCHEMA)?;
    let through: Option<i64> =
        tx.query_row("SELECT MAX(through_id) FROM usage_rollup_state", [], |r| {
            r.get(0)
        })?;
    let last: i64 = tx.query_row("SELECT IFNULL(MAX(id), 0) FROM usage_batch", [], |r| {
        r.get(0)
    })?;
    let through_id = through.unwrap_or(0);
    if through.is_some() && last <= through_id {
        return tx.commit();
    }
    if through.is_none() {
        // No watermark: whatever a rollup holds is not known to match; redo it.
        tx.execute_batch("DELETE FROM usage_minute; DELETE FROM usage_hour;")?;
    }
    let mut rows = 0i64;
    if last > through_id {
        let mut groups = Vec::new();
        {
            let mut query = tx.prepare(&format!(
                "SELECT {MINUTE_OF_STARTED}, tenant, api_key, backend, route, COUNT(*),
                        SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
                        SUM(cost_micros), MAX(started_ns)
                 FROM usage WHERE batch > ?1
                 GROUP BY 1, tenant, api_key, backend, route"
            ))?;
            let mut it = query.query([through_id])?;
            while let Some(r) = it.next()? {
                let g = MinuteGroup {
                    bucket: r.get(0)?,
                    tenant: r.get(1)?,
                    api_key: r.get(2)?,
                    backend: r.get(3)?,
                    route: r.get(4)?,
                    requests: r.get(5)?,
                    prompt_tokens: r.get(6)?,
                    completion_tokens: r.get(7)?,
                    cached_tokens: r.get(8)?,
                    cost_micros: r.get(9)?,
                    last_started_ns: r.get(10)?,
                };
                rows += g.requests;
                groups.push(g);
            }
        }
        add_to_rollups(&tx, groups.iter().map(MinuteGroup::as_ref))?;
    }
    tx.execute("DELETE FROM usage_rollup_state", [])?;
    tx.execute(
        "INSERT INTO usage_rollup_state (through_id) VALUES (?1)",
        [last],
    )?;
    tx.commit()?;
    if rows > 0 {
        tracing::info!(
            rows,
            took_ms = started.elapsed().as_millis() as u64,
            "ledger: usage rows rolled up per minute and hour (once, for rows written without the rollup)"
        );
    }
    Ok(())
}

/// One rollup increment: the rows of one tenant, key, backend and minute.
struct MinuteGroup {
    bucket: i64,
    tenant: String,
    api_key: Option<String>,
    backend: String,
    route: String,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
    cost_micros: i64,
    last_started_ns: i64,
}

#[derive(Clone, Copy)]
struct GroupRef<'a> {
    /// The minute or hour, per [`Level`].
    bucket: i64,
    tenant: &'a str,
    api_key: Option<&'a str>,
    backend: &'a str,
    route: &'a str,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
    cost_micros: i64,
    last_started_ns: i64,
}

impl<'a> GroupRef<'a> {
    /// What groups are summed by: bucket, tenant, key, backend and route.
    fn key(&self) -> (i64, &'a str, Option<&'a str>, &'a str, &'a str) {
        (
            self.bucket,
            self.tenant,
            self.api_key,
            self.backend,
            self.route,
        )
    }

    /// Adds `other`, a group with the same key.
    fn absorb(&mut self, other: &GroupRef<'_>) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
        self.last_started_ns = self.last_started_ns.max(other.last_started_ns);
    }
}

/// `groups` summed per bucket, tenant, key and backend.
fn sum_groups<'a>(groups: impl IntoIterator<Item = GroupRef<'a>>) -> Vec<GroupRef<'a>> {
    let mut sums = std::collections::HashMap::new();
    let mut add = |g: GroupRef<'a>| {
        sums.entry(g.key())
            .and_modify(|s: &mut GroupRef<'a>| s.absorb(&g))
            .or_insert(g);
    };
    // A window's rows mostly come in runs of one tenant, key, backend and
    // minute: a run is summed by comparing with the last row, and hashed
    // (SipHash over three strings) once per run instead of once per row.
    let mut run: Option<GroupRef<'a>> = None;
    for g in groups {
        match &mut run {
            Some(r) if r.key() == g.key() => r.absorb(&g),
            _ => run.replace(g).into_iter().for_each(&mut add),
        }
    }
    run.into_iter().for_each(add);
    sums.into_values().collect()
}

impl MinuteGroup {
    fn as_ref(&self) -> GroupRef<'_> {
        GroupRef {
            bucket: self.bucket,
            tenant: &self.tenant,
            api_key: self.api_key.as_deref(),
            backend: &self.backend,
            route: &self.route,
            requests: self.requests,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
            cost_micros: self.cost_micros,
            last_started_ns: self.last_started_ns,
        }
    }
}

/// Adds per-minute sums to the minute rollup and, summed per hour, to the
/// hour rollup.
fn add_to_rollups<'a>(
    tx: &rusqlite::Transaction<'_>,
    minutes: impl IntoIterator<Item = GroupRef<'a>>,
) -> rusqlite::Result<()> {
    let per_hour = HOURS.ns / MINUTES.ns;
    let minutes: Vec<GroupRef<'a>> = minutes.into_iter().collect();
    let hours = sum_groups(minutes.iter().map(|g| GroupRef {
        bucket: g.bucket.div_euclid(per_hour),
        ..*g
    }));
    for (level, groups) in [(MINUTES, &minutes), (HOURS, &hours)] {
        let mut update = tx.prepare_cached(&rollup_update(level))?;
        let mut insert = tx.prepare_cached(&rollup_insert(level))?;
        for g in groups {
            add_one(&mut update, &mut insert, g)?;
        }
    }
    Ok(())
}

fn rollup_update(level: Level) -> String {
    let Level { table, column, .. } = level;
    format!(
        "UPDATE {table} SET requests = requests + ?6, prompt_tokens = prompt_tokens + ?7,
            completion_tokens = completion_tokens + ?8, cached_tokens = cached_tokens + ?9,
            cost_micros = cost_micros + ?10, last_started_ns = MAX(last_started_ns, ?11)
         WHERE {column} = ?1 AND tenant = ?2 AND backend = ?4 AND route = ?5 AND api_key IS ?3"
    )
}

fn rollup_insert(level: Level) -> String {
    let Level { table, column, .. } = level;
    format!(
        "INSERT INTO {table} ({column}, tenant, api_key, backend, route, requests,
            prompt_tokens, completion_tokens, cached_tokens, cost_micros, last_started_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    )
}

fn add_one(
    update: &mut rusqlite::CachedStatement<'_>,
    insert: &mut rusqlite::CachedStatement<'_>,
    g: &GroupRef<'_>,
) -> rusqlite::Result<()> {
    let values = params![
        g.bucket,
        g.tenant,
        g.api_key,
        g.backend,
        g.route,
        g.requests,
        g.prompt_tokens,
        g.completion_tokens,
        g.cached_tokens,
        g.cost_micros,
        g.last_started_ns,
    ];
    if update.execute(values)? == 0 {
        insert.execute(values)?;
    }
    Ok(())
}

fn write_loop(mut conn: Connection, shared: &Shared, window: Duration, counters: &Counters) {
    // A window's write is a burst of CPU work (a fraction of a microsecond a row)
    // that no client waits on. At nice 10 this thread yields to the threads
    // serving requests when they share a core, instead of adding its burst to
    // their tail latency; under contention the window stretches, it is not
    // lost. (Linux applies the nice value to this thread only.)
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
    loop {
        let mut q = shared.lock();
        while q.rows.is_empty() && q.flushes.is_empty() && !q.closed {
            q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        // A window opened: let it fill, unless a flush or the close cuts it short.
        let deadline = Instant::now() + window;
        while q.flushes.is_empty() && !q.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = shared
                .wake
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let batch = std::mem::take(&mut q.rows);
        let waiters = std::mem::take(&mut q.flushes);
        let closed = q.closed;
        drop(q);

        let started = Instant::now();
        let result = write_batch(&mut conn, &batch).map_err(|e| e.to_string());
        match &result {
            Ok(()) if !batch.is_empty() => {
                counters
                    .last_commit_nanos
                    .store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                counters
                    .rows
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                counters.transactions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(rows = batch.len(), "ledger write failed, retrying: {e}");
                // Back in front of anything newer; the next window retries.
                let mut q = shared.lock();
                let newer = std::mem::replace(&mut q.rows, batch);
                q.rows.extend(newer);
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        if closed {
            let left = shared.lock().rows.len();
            if left > 0 {
                tracing::error!(rows = left, "ledger closed with unwritten rows");
            }
            return;
        }
    }
}

fn nanos(t: Timestamp) -> i64 {
    i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn write_batch(conn: &mut Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO usage_batch (first_started_ns, last_started_ns, rows) VALUES (?1, ?2, ?3)",
    )?;
    let mut json = Vec::with_capacity(batch.len().min(ROWS_PER_BATCH) * 192);
    for rows in batch.chunks(ROWS_PER_BATCH) {
        json.clear();
        json.push(b'[');
        let (mut first, mut last) = (i64::MAX, i64::MIN);
        for (n, r) in rows.iter().enumerate() {
            let started = nanos(r.started);
            (first, last) = (first.min(started), last.max(started));
            if n > 0 {
                json.push(b',');
            }
            r.write_json(&mut json);
        }
        json.push(b']');
        let text = std::str::from_utf8(&json)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        insert.execute(params![first, last, text])?;
        // Give the core back after each full batch: on a core shared with the
        // threads serving requests, a request then waits behind at most one
        // batch (tens of microseconds), not the whole window's rows (the
        // scheduler lets a running thread finish its slice, nice value or
        // not). Measured: the proxy bench's added p99 at concurrency 16 is
        // 3x higher with one yield per window.
        if rows.len() == ROWS_PER_BATCH {
            thread::yield_now();
        }
    }
    drop(insert);
    let last_id = tx.last_insert_rowid();
    // The batch summed per tenant, key, backend and minute, in this transaction.
    let groups = sum_groups(batch.iter().map(|r| {
        let started = nanos(r.started);
        GroupRef {
            bucket: started.div_euclid(MINUTES.ns),
            tenant: &r.tenant,
            api_key: r.api_key.as_deref(),
            backend: &r.backend,
            route: &r.route,
            requests: 1,
            prompt_tokens: int(r.usage.prompt_tokens),
            completion_tokens: int(r.usage.completion_tokens),
            cached_tokens: int(r.usage.cached_tokens),
            cost_micros: int(r.usage.cost_micros),
            last_started_ns: started,
        }
    }));
    add_to_rollups(&tx, groups)?;
    tx.prepare_cached("UPDATE usage_rollup_state SET through_id = ?1")?
        .execute([last_id])?;
    tx.commit()
}

fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Feeds the current windows of `budget` from the ledger at `path` (call on
/// start, after [`Ledger::open`], before serving). Returns the rows read back.
///
/// Reads the hour and minute rollups for whole buckets and raw rows only
/// where no bucket is whole for the plan; a ledger without up-to-date
/// rollups (not opened by this version since) is read row by row, with the
/// same result.
pub fn rebuild(path: &Path, budget: &Budget, now: Timestamp) -> anyhow::Result<u64> {
    let plan = budget.restore_plan(now);
    let mut conn = open_reader(path)?;
    // One read transaction: the rollup and the rows are one snapshot.
    let tx = conn.transaction()?;
    let (history, rows) = if rollup_is_current(&tx)? {
        history_from_rollup(&tx, &plan)
    } else {
        tracing::warn!(
            ledger = %path.display(),
            "the ledger's rollups are missing or behind; rebuilding row by row"
        );
        history_per_row(&tx, &plan)
    }
    .with_context(|| format!("cannot read the ledger {}", path.display()))?;
    drop(tx);
    budget.restore(history, now);
    Ok(rows)
}

/// Whether the rollups sum every `usage` row.
fn rollup_is_current(conn: &Connection) -> rusqlite::Result<bool> {
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) = 3 FROM sqlite_master
         WHERE type = 'table' AND name IN ('usage_minute', 'usage_hour', 'usage_rollup_state')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(false);
    }
    conn.query_row(
        "SELECT (SELECT MAX(through_id) FROM usage_rollup_state)
                >= (SELECT IFNULL(MAX(id), 0) FROM usage_batch)",
        [],
        |r| r.get::<_, Option<bool>>(0).map(|b| b.unwrap_or(false)),
    )
}

/// The aggregation rules of [`Budget::restore_plan`] as SQL group terms over
/// the instant `{t}` (nanoseconds): aggregates never span a calendar boundary
/// (`cal`) nor mix grains (`grain`): whole segments before `minutes_from`,
/// minutes before `rows_from`, single rows after (`sub`, where `{minute}` and
/// `{id}` name the minute and the row). Parameters: ?1 month start, ?2 day
/// start, ?3 minutes_from, ?4 rows_from.
fn group_terms(t: &str, minute: &str, id: &str) -> String {
    format!(
        "({t} >= ?1) + ({t} >= ?2) AS cal, ({t} >= ?3) + ({t} >= ?4) AS grain,
         CASE WHEN {t} >= ?4 THEN {id} WHEN {t} >= ?3 THEN {minute} ELSE 0 END AS sub"
    )
}

/// The history's aggregates, keyed like the GROUP BY of [`history_per_row`]:
/// tenant, key and backend (interned, so a row read costs no allocation),
/// calendar segment, grain and sub-group.
#[derive(Default)]
struct Groups {
    names: std::collections::HashMap<String, u32>,
    map: std::collections::HashMap<(u32, u32, u32, i64, i64, i64), RestoredUsage>,
}

impl Groups {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.names.len() as u32 + 1;
        self.names.insert(name.to_owned(), id);
        id
    }

    /// Adds every row of `stmt`, whose columns are: tenant, api_key, backend,
    /// requests, tokens, cost_micros, latest start (ns), cal, grain, sub.
    fn read(
        &mut self,
        stmt: &mut rusqlite::Statement<'_>,
        params: impl rusqlite::Params,
    ) -> rusqlite::Result<()> {
        let mut it = stmt.query(params)?;
        while let Some(row) = it.next()? {
            let n = |i| row.get::<_, i64>(i).map(|v| v.max(0) as u64);
            let tenant = row.get_ref(0)?.as_str()?;
            let api_key = row.get_ref(1)?.as_str_or_null()?;
            let backend = row.get_ref(2)?.as_str()?;
            let key = (
                self.intern(tenant),
                api_key.map_or(0, |k| self.intern(k)),
                self.intern(backend),
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            );
            let at: i64 = row.get(6)?;
            let at = Timestamp::from_nanosecond(at as i128).unwrap_or(Timestamp::MIN);
            let u = self.map.entry(key).or_insert_with(|| RestoredUsage {
                tenant: tenant.to_owned(),
                api_key: api_key.map(str::to_owned),
                backend: backend.to_owned(),
                at,
                requests: 0,
                tokens: 0,
                cost_micros: 0,
            });
            u.at = u.at.max(at);
            u.requests += n(3)?;
            u.tokens += n(4)?;
            u.cost_micros += n(5)?;
        }
        Ok(())
    }

    /// The history, and the ledger rows it sums.
    fn finish(self) -> (Vec<RestoredUsage>, u64) {
        let history: Vec<RestoredUsage> = self.map.into_values().collect();
        let rows = history.iter().map(|u| u.requests).sum();
        (history, rows)
    }
}

/// Where one part of the history is read from.
enum Piece {
    /// Buckets `[from, to)` of a rollup.
    Rollup(Level, i64, i64),
    /// Rows started in `[from, to)` (no end: all later ones).
    Rows(i64, Option<i64>),
}

/// Splits `[lo, hi)`, which lies within one calendar segment and grain of
/// the plan, into whole buckets of `levels[0]`, then of the finer levels for
/// the ends, then raw rows for what no bucket covers whole.
fn cover(levels: &[Level], lo: i64, hi: i64, out: &mut Vec<Piece>) {
    if lo >= hi {
        return;
    }
    let Some((&level, finer)) = levels.split_first() else {
        out.push(Piece::Rows(lo, Some(hi)));
        return;
    };
    let first = lo.div_euclid(level.ns) + i64::from(lo.rem_euclid(level.ns) != 0);
    let last = hi.div_euclid(level.ns);
    if first >= last {
        return cover(finer, lo, hi, out);
    }
    cover(finer, lo, first.saturating_mul(level.ns), out);
    out.push(Piece::Rollup(level, first, last));
    cover(finer, last.saturating_mul(level.ns), hi, out);
}

/// The history [`Budget::restore`] needs, read from the rollups wherever a
/// bucket lies whole within one grain and calendar segment of the plan:
/// hours (else minutes) before `minutes_from`, minutes up to `rows_from`,
/// raw rows after it and at cuts that split a minute. Equal to
/// [`history_per_row`] as a multiset; it reads at most a few hundred rows
/// per key, backend and hour of the period (the last day per minute), not
/// one per request.
fn history_from_rollup(
    conn: &Connection,
    plan: &RestorePlan,
) -> rusqlite::Result<(Vec<RestoredUsage>, u64)> {
    let since = nanos(plan.since);
    let bounds = [
        nanos(plan.month_start),
        nanos(plan.day_start),
        nanos(plan.minutes_from),
        nanos(plan.rows_from),
    ];
    let (minutes_from, rows_from) = (bounds[2], bounds[3]);
    // Every cut from `since` to `rows_from` (both included); between two,
    // the grain and calendar segment are fixed.
    let mut cuts: Vec<i64> = [since, bounds[0], bounds[1], minutes_from, rows_from]
        .into_iter()
        .filter(|c| (since..=rows_from).contains(c))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    for w in cuts.windows(2) {
        let levels: &[Level] = if w[1] <= minutes_from {
            &[HOURS, MINUTES]
        } else {
            &[MINUTES]
        };
        cover(levels, w[0], w[1], &mut pieces);
    }
    pieces.push(Piece::Rows(rows_from.max(since), None));

    let mut groups = Groups::default();
    for piece in pieces {
        match piece {
            // Summed here rather than by a GROUP BY: SQLite would sort them.
            Piece::Rollup(level, from, to) => {
                let Level { table, column, ns } = level;
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT tenant, api_key, backend, requests,
                            prompt_tokens + completion_tokens, cost_micros, last_started_ns, {}
                     FROM {table} WHERE {column} >= ?5 AND {column} < ?6",
                    group_terms(&format!("{column} * {ns}"), column, "0")
                ))?;
                groups.read(
                    &mut stmt,
                    params![bounds[0], bounds[1], bounds[2], bounds[3], from, to],
                )?;
            }
            Piece::Rows(from, to) => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT tenant, api_key, backend, COUNT(*),
                            SUM(prompt_tokens + completion_tokens), SUM(cost_micros),
                            MAX(started_ns), {}
                     FROM usage WHERE {}
                     GROUP BY tenant, api_key, backend, cal, grain, sub",
                    group_terms("started_ns", MINUTE_OF_STARTED, "id"),
                    started_within("?5", "?6"),
                ))?;
                groups.read(
                    &mut stmt,
                    params![bounds[0], bounds[1], bounds[2], bounds[3], from, to],
                )?;
            }
        }
    }
    Ok(groups.finish())
}

/// The history straight from the rows: one GROUP BY over every row since
/// `plan.since` (what [`history_from_rollup`] replaces; its cost grows with
/// the month's rows).
fn history_per_row(
    conn: &Connection,
    plan: &RestorePlan,
) -> rusqlite::Result<(Vec<RestoredUsage>, u64)> {
    let mut query = conn.prepare(&format!(
        "SELECT tenant, api_key, backend, COUNT(*), SUM(prompt_tokens + completion_tokens),
                SUM(cost_micros), MAX(started_ns), {}
         FROM usage WHERE started_ns >= ?5
         GROUP BY tenant, api_key, backend, cal, grain, sub",
        group_terms("started_ns", MINUTE_OF_STARTED, "id")
    ))?;
    let mut groups = Groups::default();
    groups.read(
        &mut query,
        params![
            nanos(plan.month_start),
            nanos(plan.day_start),
            nanos(plan.minutes_from),
            nanos(plan.rows_from),
            nanos(plan.since),
        ],
    )?;
    Ok(groups.finish())
}

/// Spend of one tenant on one route over a period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant: String,
    pub route: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost_micros: u64,
}

/// Spend per tenant and route of the requests started in `[from, to)`,
/// sorted by tenant then route.
pub fn usage_report(path: &Path, from: Timestamp, to: Timestamp) -> anyhow::Result<Vec<UsageRow>> {
    let mut conn = open_reader(path)?;
    if has_row_table(&conn)? {
        anyhow::bail!(
            "the ledger {} is in the format of an older kedge; restart the kedge service \
             (it migrates the ledger on start) and run this again",
            path.display()
        );
    }
    // One read transaction: the rollups and the rows are one snapshot.
    let tx = conn.transaction()?;
    let from_rollup = rollup_is_current(&tx)?;
    report(&tx, nanos(from), nanos(to), from_rollup)
        .with_context(|| format!("cannot read the ledger {}", path.display()))
}

/// The spend of requests started in `[from, to)`: whole hours and minutes
/// from the rollups (`from_rollup`), raw rows only where a period's ends
/// split a minute, so a month costs what its hours cost, not its requests;
/// else every row.
fn report(
    conn: &Connection,
    from: i64,
    to: i64,
    from_rollup: bool,
) -> rusqlite::Result<Vec<UsageRow>> {
    let mut pieces = Vec::new();
    if from_rollup {
        cover(&[HOURS, MINUTES], from, to, &mut pieces);
    } else if from < to {
        pieces.push(Piece::Rows(from, Some(to)));
    }
    let mut sums = std::collections::BTreeMap::<(String, String), UsageRow>::new();
    for piece in pieces {
        let (sql, lo, hi) = match piece {
            Piece::Rollup(Level { table, column, .. }, lo, hi) => (
                format!(
                    "SELECT tenant, route, SUM(requests), SUM(prompt_tokens),
                            SUM(completion_tokens), SUM(cached_tokens), SUM(cost_micros)
                     FROM {table} WHERE {column} >= ?1 AND {column} < ?2
                     GROUP BY tenant, route"
                ),
                lo,
                Some(hi),
            ),
            Piece::Rows(lo, hi) => (
                format!(
                    "SELECT tenant, route, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
                            SUM(cached_tokens), SUM(cost_micros)
                     FROM usage WHERE {} GROUP BY tenant, route",
                    started_within("?1", "?2")
                ),
                lo,
                hi,
            ),
        };
        let mut stmt = conn.prepare(&sql)?;
        let mut it = stmt.query(params![lo, hi])?;
        while let Some(row) = it.next()? {
            let n = |i| row.get::<_, i64>(i).map(|v| v.max(0) as u64);
            let (tenant, route): (String, String) = (row.get(0)?, row.get(1)?);
            let sum = sums
                .entry((tenant.clone(), route.clone()))
                .or_insert_with(|| UsageRow {
                    tenant,
                    route,
                    ..UsageRow::default()
                });
            sum.requests += n(2)?;
            sum.prompt_tokens += n(3)?;
            sum.completion_tokens += n(4)?;
            sum.cached_tokens += n(5)?;
            sum.cost_micros += n(6)?;
        }
    }
    Ok(sums.into_values().collect())
}

/// The rows as an aligned text table with a total line.
pub fn format_usage_table(rows: &[UsageRow]) -> String {
    let header = [
        "TENANT",
        "ROUTE",
        "REQUESTS",
        "PROMPT",
        "COMPLETION",
        "CACHED",
        "COST",
    ];
    let line = |r: &UsageRow| {
        [
            r.tenant.clone(),
            r.route.clone(),
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cached_tokens.to_string(),
            format_dollars(r.cost_micros),
        ]
    };
    let total = rows.iter().fold(
        UsageRow {
            tenant: "TOTAL".into(),
            ..UsageRow::default()
        },
        |mut t, r| {
            t.requests += r.requests;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.cached_tokens += r.cached_tokens;
            t.cost_micros += r.cost_micros;
            t
        },
    );
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    table.extend(rows.iter().map(line));
    table.push(line(&total));
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            // Names left-aligned, numbers right-aligned.
            let gap = if c == 0 { "" } else { "  " };
            let _ = if c < 2 {
                write!(out, "{gap}{cell:<w$}")
            } else {
                write!(out, "{gap}{cell:>w$}")
            };
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
