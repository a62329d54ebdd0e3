//! Progress of one job per destination: counters the transfer bumps, and a
//! renderer that shows them to a person.
//!
//! Promises: counting is two relaxed atomic adds per part; rendering never
//! blocks the transfer. On a terminal each destination gets a bar (bytes, rate,
//! ETA); otherwise a plain line per destination every few seconds, which reads
//! well in a journal or a CI log.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// State of a destination as the renderer shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Uploading = 0,
    Verifying = 1,
    Done = 2,
    Failed = 3,
    /// Verified; being imported as a custom image.
    Importing = 4,
    /// Verified and imported: the image is AVAILABLE.
    Imported = 5,
}

/// Where a destination's import stands, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct ImportShown {
    pub image_id: Option<String>,
    /// The image's lifecycle state, or what ferry does before there is one.
    pub state: String,
    pub percent: Option<f64>,
}

#[derive(Debug)]
pub struct DestinationProgress {
    pub name: String,
    pub total_bytes: u64,
    done_bytes: AtomicU64,
    phase: AtomicU8,
    import: Mutex<Option<ImportShown>>,
}

impl DestinationProgress {
    pub fn add(&self, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn reset(&self) {
        self.done_bytes.store(0, Ordering::Relaxed);
        self.set_phase(Phase::Uploading);
    }
    pub fn done_bytes(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
    }
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Uploading,
            1 => Phase::Verifying,
            2 => Phase::Done,
            4 => Phase::Importing,
            5 => Phase::Imported,
            _ => Phase::Failed,
        }
    }
    /// Where the import stands (`None` before it begins).
    pub fn set_import(&self, shown: ImportShown) {
        if let Ok(mut i) = self.import.lock() {
            *i = Some(shown);
        }
    }
    pub fn import(&self) -> Option<ImportShown> {
        self.import.lock().ok().and_then(|i| i.clone())
    }
}

/// Counters of one job.
#[derive(Debug)]
pub struct Progress {
    pub file_name: String,
    pub started: Instant,
    pub destinations: Vec<Arc<DestinationProgress>>,
    /// The next part's read waits for part-buffer memory.
    memory_wait: std::sync::atomic::AtomicBool,
    /// Before the upload: a conversion's step (`converting`, `comparing`,
    /// or `waiting` for a conversion slot) and its percentage.
    conversion: Mutex<Option<(&'static str, f64)>>,
}

impl Progress {
    pub fn new(file_name: &str, total_bytes: u64, names: &[&str]) -> Arc<Progress> {
        Arc::new(Progress {
            file_name: file_name.to_string(),
            started: Instant::now(),
            destinations: names
                .iter()
                .map(|n| {
                    Arc::new(DestinationProgress {
                        name: n.to_string(),
                        total_bytes,
                        done_bytes: AtomicU64::new(0),
                        phase: AtomicU8::new(Phase::Uploading as u8),
                        import: Mutex::new(None),
                    })
                })
                .collect(),
            memory_wait: Default::default(),
            conversion: Mutex::new(None),
        })
    }

    /// Where the conversion before the upload stands.
    pub fn set_conversion(&self, step: &'static str, percent: f64) {
        if let Ok(mut c) = self.conversion.lock() {
            *c = Some((step, percent));
        }
    }

    /// The conversion's step and percentage, while there is one.
    pub fn conversion(&self) -> Option<(&'static str, f64)> {
        self.conversion.lock().ok().and_then(|c| *c)
    }

    /// Whether the job's next read waits for part-buffer memory now.
    pub fn waiting_for_memory(&self) -> bool {
        self.memory_wait.load(Ordering::Relaxed)
    }

    pub fn get(&self, name: &str) -> Option<Arc<DestinationProgress>> {
        self.destinations.iter().find(|d| d.name == name).cloned()
    }
}

/// Jobs in flight, for status lines and `/status`.
#[derive(Default)]
pub struct Board {
    jobs: std::sync::Mutex<std::collections::BTreeMap<String, Arc<Progress>>>,
}

impl Board {
    pub fn snapshot(&self) -> Vec<Arc<Progress>> {
        self.jobs
            .lock()
            .map(|j| j.values().cloned().collect())
            .unwrap_or_default()
    }
    pub fn insert(&self, name: &str, p: Arc<Progress>) {
        if let Ok(mut j) = self.jobs.lock() {
            j.insert(name.to_string(), p);
        }
    }
    /// Puts `p` on the board unless a job of that name is on it already;
    /// false then.
    pub fn insert_new(&self, name: &str, p: Arc<Progress>) -> bool {
        match self.jobs.lock() {
            Ok(mut j) if !j.contains_key(name) => {
                j.insert(name.to_string(), p);
                true
            }
            _ => false,
        }
    }
    pub fn remove(&self, name: &str) {
        if let Ok(mut j) = self.jobs.lock() {
            j.remove(name);
        }
    }
}

/// Shows progress until dropped.
pub struct Renderer {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Renderer {
    /// Bars on a terminal, periodic lines otherwise (every `line_every`).
    pub fn start(progress: Arc<Progress>, line_every: Duration) -> Renderer {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let tty = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let bars = tty.then(|| bars(&progress));
            let tick = if tty {
                Duration::from_millis(200)
            } else {
                line_every
            };
            let mut final_said = vec![false; progress.destinations.len()];
            let mut interval = tokio::time::interval(tick);
            interval.tick().await;
            loop {
                let last = tokio::select! {
                    _ = interval.tick() => false,
                    _ = stopped.changed() => true,
                };
                match &bars {
                    Some((_, bars)) => {
                        for (bar, d) in bars.iter().zip(&progress.destinations) {
                            bar.set_position(d.done_bytes());
                            match d.phase() {
                                Phase::Verifying => bar.set_message("verifying"),
                                Phase::Done => bar.finish_with_message("verified"),
                                Phase::Importing => bar.set_message("importing"),
                                Phase::Imported => bar.finish_with_message("imported"),
                                Phase::Failed => bar.abandon_with_message("FAILED"),
                                Phase::Uploading => {}
                            }
                        }
                    }
                    None if !last => {
                        for (d, said) in progress.destinations.iter().zip(final_said.iter_mut()) {
                            // A finished destination is reported once, not every tick.
                            if !*said {
                                eprintln!("{}", line(&progress, d));
                            }
                            *said =
                                matches!(d.phase(), Phase::Done | Phase::Imported | Phase::Failed);
                        }
                    }
                    None => {}
                }
                if last {
                    break;
                }
            }
            if let Some((multi, _)) = bars {
                let _ = multi.clear();
            }
        });
        Renderer {
            stop,
            task: Some(task),
        }
    }

    /// Stops and waits for the last frame.
    pub async fn finish(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Renderer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn bars(progress: &Progress) -> (MultiProgress, Vec<ProgressBar>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bars = progress
        .destinations
        .iter()
        .map(|d| {
            let b = multi.add(ProgressBar::new(d.total_bytes));
            b.set_style(style.clone());
            b.set_prefix(d.name.clone());
            b
        })
        .collect();
    (multi, bars)
}

/// One plain progress line, e.g. `phoenix: 512.0 MiB of 1.0 GiB (50%), 420.3 MiB/s, ETA 1s`.
pub fn line(progress: &Progress, d: &DestinationProgress) -> String {
    let done = d.done_bytes();
    let secs = progress.started.elapsed().as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let pct = if d.total_bytes == 0 {
        100.0
    } else {
        done as f64 * 100.0 / d.total_bytes as f64
    };
    let eta = if rate > 0.0 {
        let left = d.total_bytes.saturating_sub(done) as f64 / rate;
        humantime::format_duration(Duration::from_secs(left.ceil() as u64)).to_string()
    } else {
        "unknown".into()
    };
    let phase = match d.phase() {
        Phase::Uploading => String::new(),
        Phase::Verifying => " [verifying]".into(),
        Phase::Done => " [verified]".into(),
        Phase::Importing => " [verified; importing]".into(),
        Phase::Imported => " [verified; imported]".into(),
        Phase::Failed => " [FAILED]".into(),
    };
    format!(
        "{}: {}: {} of {} ({pct:.0}%), {}/s, ETA {eta}{phase}",
        progress.file_name,
        d.name,
        bytesize::ByteSize(done).display().iec(),
        bytesize::ByteSize(d.total_bytes).display().iec(),
        bytesize::ByteSize(rate as u64).display().iec(),
    )
}
/// Logs one progress line per destination every 30 s for long jobs.
pub struct ProgressLog {
    progress: Arc<Progress>,
    last: Mutex<Instant>,
}

impl ProgressLog {
    pub fn new(progress: Arc<Progress>) -> ProgressLog {
        ProgressLog {
            progress,
            last: Mutex::new(Instant::now()),
        }
    }
}

/// The board learns from the events that a job waits for memory.
impl crate::events::Observer for Progress {
    fn memory_wait(&self, waiting: bool) {
        self.memory_wait.store(waiting, Ordering::Relaxed);
    }
}

impl crate::events::Observer for ProgressLog {
    fn part_done(&self, _d: &str, _r: &crate::store::PartReceipt, _took: Duration) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.elapsed() < Duration::from_secs(30) {
            return;
        }
        *last = Instant::now();
        for d in &self.progress.destinations {
            tracing::info!("{}", line(&self.progress, d));
        }
    }
}
