//! Bandwidth limits: the rate a timetable allows now, and the token buckets
//! every upload pays into before a part goes on the wire.
//!
//! Promises:
//! - `transfer.bandwidth_limit` binds all destinations together, and a
//!   destination's own `bandwidth_limit` binds it alone; a part is sent only
//!   once every bucket it pays into is out of debt, so over a stretch of
//!   several parts the bytes sent stay within each limit;
//! - a limit is a rate (`"20MiB"`, `"off"`) or a timetable in rclone's form
//!   (`"08:00,20MiB 19:00,off"`, with days: `"Mon-08:00,20MiB Sat-00:00,off"`),
//!   read in the host's local time; seconds (`08:00:30`) are allowed too;
//! - new limits (SIGHUP, a timetable's next entry) bind the parts waiting to
//!   be sent from that moment: nothing waits out a rate that no longer holds.
//!
//! Design choice: a part is paid for whole, before it is sent, and a bucket
//! may go into debt by one part; the next part waits until the debt is paid.
//! Bytes are not paced inside a part: object_store sends a part as one
//! request body, with no hook for a throttled body. At a limit far below the
//! link's speed the wire therefore sees one part at the link's speed, then a
//! pause, with the average at the limit. Retries pay again (they are bytes on
//! the wire too). Reads (a read-back, an object source) are not limited: the
//! limit is for the uplink.
//!
//! Written by hand: `governor`, the usual rate limiter, fixes its quota when
//! it is built and refuses a request larger than its burst, while a part (up
//! to 5 GiB) is paid for whole and a timetable changes the rate as it runs;
//! no crate reads rclone's timetables.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The `destination` label of `transfer.bandwidth_limit`, the limit of all
/// destinations together (a destination's name cannot hold parentheses).
pub const ALL: &str = "(all)";

/// How often a waiting part looks again at its buckets, so that a new rate
/// (SIGHUP, the timetable) binds it within this long.
const RECHECK: Duration = Duration::from_millis(250);

const DAY_SECS: u32 = 86_400;
const WEEK_SECS: u32 = 7 * DAY_SECS;
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// A rate, or a timetable of rates, as the configuration gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    /// (second of the week from Monday 00:00, bytes per second or none),
    /// sorted; the first entry holds until the second, and the last one
    /// until the first of the next week.
    points: Vec<(u32, Option<u64>)>,
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Schedule, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let text = words.join(" ");
        match words.as_slice() {
            [] => {
                return Err(
                    "is empty: give a rate (\"20MiB\", \"off\") or a timetable (\"08:00,20MiB 19:00,off\")"
                        .into(),
                );
            }
            [one] if !one.contains(',') => {
                return Ok(Schedule {
                    text,
                    points: vec![(0, rate(one)?)],
                });
            }
            many if many.iter().all(|w| !w.contains(',')) && rate(&many.concat()).is_ok() => {
                return Err(format!(
                    "has spaces inside a rate: write it as one word, e.g. \"{}\"",
                    many.concat()
                ));
            }
            _ => {}
        }
        let mut points = Vec::new();
        for word in &words {
            let (when, r) = word.split_once(',').ok_or_else(|| {
                format!(
                    "{word:?} is not TIME,RATE: write e.g. \"08:00,20MiB\" or \"Mon-08:00,off\""
                )
            })?;
            let r = rate(r)?;
            let (day, time) = match when.split_once('-') {
                Some((d, t)) => (Some(day(d)?), t),
                None => (None, when),
            };
            let secs = time_of_day(time)?;
            match day {
                Some(d) => points.push((d * DAY_SECS + secs, r)),
                None => points.extend((0..7).map(|d| (d * DAY_SECS + secs, r))),
            }
        }
        points.sort_by_key(|p| p.0);
        if let Some(w) = points.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!(
                "has two entries for {}: keep one",
                when_text(w[0].0)
            ));
        }
        Ok(Schedule { text, points })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("bandwidth limit {s:?} {e}")))
    }
}

/// `"off"`, or a size per second with its unit (`20MiB`, `512KiB/s`, `1GB`).
fn rate(s: &str) -> Result<Option<u64>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let size = s.strip_suffix("/s").unwrap_or(s);
    if size.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "has the rate {s:?} without a unit: write e.g. \"20MiB\" (bytes per second) or \"off\""
        ));
    }
    // rclone reads 10M as 10 MiB, bytesize as 10 MB: say which.
    let unit = size.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    if unit.len() == 1 {
        return Err(format!(
            "has the rate {s:?}: write the unit whole, \"{n}{u}iB\" (binary, as rclone reads {u}) or \"{n}{u}B\"",
            n = &size[..size.len() - 1],
            u = unit.to_ascii_uppercase()
        ));
    }
    let bytes = size
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("has the rate {s:?}: write e.g. \"20MiB\", \"512KiB\" or \"off\""))?
        .as_u64();
    if bytes == 0 {
        return Err(format!("has the rate {s:?}: write \"off\" for no limit"));
    }
    Ok(Some(bytes))
}

fn day(s: &str) -> Result<u32, String> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|d| d as u32)
        .ok_or_else(|| format!("has the day {s:?}: use Mon, Tue, Wed, Thu, Fri, Sat or Sun"))
}

/// `HH:MM` or `HH:MM:SS`, as seconds since midnight.
fn time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("has the time {s:?}: use HH:MM (00:00 to 23:59), or HH:MM:SS");
    let fields: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&fields.len()) || fields.iter().any(|f| f.len() != 2) {
        return Err(bad());
    }
    let n: Vec<u32> = fields
        .iter()
        .map(|f| f.parse::<u32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + sec)
}

fn when_text(second_of_week: u32) -> String {
    let d = second_of_week / DAY_SECS;
    let s = second_of_week % DAY_SECS;
    format!(
        "{} {:02}:{:02}:{:02}",
        DAYS[d as usize],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

impl Schedule {
    /// The rate in bytes per second at `second_of_week` (Monday 00:00 is 0);
    /// `None`: no limit.
    pub fn rate_at(&self, second_of_week: u32) -> Option<u64> {
        self.points
            .iter()
            .rev()
            .find(|p| p.0 <= second_of_week)
            .or(self.points.last())
            .and_then(|p| p.1)
    }

    /// The rate now, in the host's local time.
    pub fn rate_now(&self) -> Option<u64> {
        self.rate_at(now_in_week())
    }
}

/// Seconds since Monday 00:00, local time.
fn now_in_week() -> u32 {
    use chrono::{Datelike, Timelike};
    let now = chrono::Local::now();
    (now.weekday().num_days_from_monday() * DAY_SECS + now.num_seconds_from_midnight()) % WEEK_SECS
}

/// One token bucket: bytes it may still send (negative: its debt), at the
/// rate its schedule gave when it was last refilled.
#[derive(Debug)]
struct Bucket {
    schedule: Option<Schedule>,
    rate: Option<u64>,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(schedule: Option<Schedule>, now: Instant) -> Bucket {
        Bucket {
            schedule,
            rate: None,
            tokens: 0.0,
            at: now,
        }
    }

    /// Pays the debt down at the rate that held since the last refill, then
    /// takes up the rate that holds now. A bucket never saves tokens beyond
    /// zero: after a quiet spell the next part goes at once, and the one
    /// after it waits (a burst of one part). A limit lifted forgives the debt.
    fn refill(&mut self, now: Instant, rate_now: Option<u64>) {
        if let Some(r) = self.rate {
            let earned = now.saturating_duration_since(self.at).as_secs_f64() * r as f64;
            self.tokens = (self.tokens + earned).min(0.0);
        }
        if rate_now.is_none() {
            self.tokens = 0.0;
        }
        self.rate = rate_now;
        self.at = now;
    }

    /// How long until this bucket is out of debt.
    fn short(&self) -> Option<Duration> {
        let r = self.rate?;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / r as f64))
    }
}

#[derive(Debug)]
struct Buckets {
    all: Bucket,
    destinations: BTreeMap<String, Bucket>,
}

/// The limits every job of a daemon (or a push) shares; replaced in place on
/// SIGHUP, so jobs in flight follow the new limits.
#[derive(Debug)]
pub struct Bandwidth {
    buckets: Mutex<Buckets>,
}

/// The limits in force now, for `/status` and the gauges.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limit {
    /// Bytes per second; `None`: no limit.
    pub bytes_per_sec: Option<u64>,
    /// The configured rate or timetable; `None`: none configured.
    pub schedule: Option<String>,
}

impl Bandwidth {
    /// `all`: the limit of every destination together; `destinations`: each
    /// configured destination's own (`None`: none of its own).
    pub fn new(
        all: Option<Schedule>,
        destinations: BTreeMap<String, Option<Schedule>>,
    ) -> Bandwidth {
        let now = Instant::now();
        Bandwidth {
            buckets: Mutex::new(Buckets {
                all: Bucket::new(all, now),
                destinations: destinations
                    .into_iter()
                    .map(|(name, s)| (name, Bucket::new(s, now)))
                    .collect(),
            }),
        }
    }

    /// No limit anywhere.
    pub fn unlimited() -> Bandwidth {
        Bandwidth::new(None, BTreeMap::new())
    }

    /// New limits (a reload). A destination that keeps a limit keeps its
    /// debt, so a reload is no way around it.
    pub fn set(&self, all: Option<Schedule>, destinations: BTreeMap<String, Option<Schedule>>) {
        let mut b = self.lock();
        let now = Instant::now();
        b.all.schedule = all;
        let mut old = std::mem::take(&mut b.destinations);
        b.destinations = destinations
            .into_iter()
            .map(|(name, s)| {
                let mut bucket = old.remove(&name).unwrap_or_else(|| Bucket::new(None, now));
                bucket.schedule = s;
                (name, bucket)
            })
            .collect();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // A panic while holding it leaves numbers, never a broken invariant.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `destination` may send `bytes`, then charges them to its
    /// bucket and to the bucket of all destinations.
    pub async fn take(&self, destination: &str, bytes: u64) {
        loop {
            let wait = {
                let mut b = self.lock();
                let now = Instant::now();
                let week = now_in_week();
                let Buckets { all, destinations } = &mut *b;
                let mut paying: Vec<&mut Bucket> = vec![all];
                if let Some(d) = destinations.get_mut(destination) {
                    paying.push(d);
                }
                for bucket in paying.iter_mut() {
                    let rate = bucket.schedule.as_ref().and_then(|s| s.rate_at(week));
                    bucket.refill(now, rate);
                }
                match paying.iter().filter_map(|b| b.short()).max() {
                    Some(w) => w,
                    None => {
                        for bucket in paying {
                            if bucket.rate.is_some() {
                                bucket.tokens -= bytes as f64;
                            }
                        }
                        return;
                    }
                }
            };
            tokio::time::sleep(wait.min(RECHECK)).await;
        }
    }

    /// The limit of all destinations together ([`ALL`]) and of each
    /// configured destination, as they hold now.
    pub fn limits(&self) -> BTreeMap<String, Limit> {
        let b = self.lock();
        let week = now_in_week();
        let limit = |bucket: &Bucket| Limit {
            bytes_per_sec: bucket.schedule.as_ref().and_then(|s| s.rate_at(week)),
            schedule: bucket.schedule.as_ref().map(|s| s.to_string()),
        };
        let mut out: BTreeMap<String, Limit> = b
            .destinations
            .iter()
            .map(|(name, bucket)| (name.clone(), limit(bucket)))
            .collect();
        out.insert(ALL.to_string(), limit(&b.all));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u32, h: u32, m: u32) -> u32 {
        day * DAY_SECS + h * 3600 + m * 60
    }

    #[test]
    fn a_rate_holds_all_week() {
        let s: Schedule = "20MiB".parse().unwrap();
        assert_eq!(s.rate_at(0), Some(20 << 20));
        assert_eq!(s.rate_at(WEEK_SECS - 1), Some(20 << 20));
        assert_eq!("off".parse::<Schedule>().unwrap().rate_at(5), None);
        assert_eq!(
            "512KiB/s".parse::<Schedule>().unwrap().rate_at(5),
            Some(512 << 10)
        );
    }

    #[test]
    fn a_daily_timetable_wraps_to_the_day_before() {
        let s: Schedule = "08:00,20MiB 19:00,off".parse().unwrap();
        assert_eq!(
            s.rate_at(at(0, 7, 59)),
            None,
            "before 08:00: yesterday's 19:00"
        );
        assert_eq!(s.rate_at(at(0, 8, 0)), Some(20 << 20));
        assert_eq!(s.rate_at(at(3, 18, 59)), Some(20 << 20));
        assert_eq!(s.rate_at(at(3, 19, 0)), None);
        assert_eq!(s.rate_at(at(0, 0, 0)), None, "Monday 00:00: Sunday's 19:00");
    }

    #[test]
    fn days_make_a_weekly_timetable() {
        let s: Schedule = "Mon-08:00,1MiB Fri-18:00,off sat-10:00:30,2MiB"
            .parse()
            .unwrap();
        assert_eq!(
            s.rate_at(at(0, 7, 0)),
            Some(2 << 20),
            "Monday 07:00: Saturday's"
        );
        assert_eq!(s.rate_at(at(2, 12, 0)), Some(1 << 20));
        assert_eq!(s.rate_at(at(4, 18, 0)), None);
        assert_eq!(s.rate_at(at(5, 10, 0)), None);
        assert_eq!(s.rate_at(at(5, 10, 0) + 30), Some(2 << 20));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, words) in [
            ("", "is empty"),
            ("20", "without a unit"),
            ("0MiB", "write \"off\""),
            ("08:00 20MiB", "is not TIME,RATE"),
            ("25:00,1MiB", "has the time \"25:00\""),
            ("8:00,1MiB", "has the time \"8:00\""),
            ("Mo-08:00,1MiB", "has the day \"Mo\""),
            ("08:00,fast", "has the rate \"fast\""),
            ("08:00,1MiB Tue-08:00,off", "two entries for Tue 08:00:00"),
            ("20 MiB", "write it as one word, e.g. \"20MiB\""),
            ("10M", "\"10MiB\" (binary, as rclone reads M) or \"10MB\""),
            ("08:00,512k", "\"512KiB\""),
        ] {
            let e = text.parse::<Schedule>().unwrap_err();
            assert!(e.contains(words), "{text:?}: {e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn parts_are_spaced_by_the_slowest_bucket_that_pays() {
        let bw = Bandwidth::new(
            Some("4MiB".parse().unwrap()),
            [
                ("slow".to_string(), Some("1MiB".parse().unwrap())),
                ("free".to_string(), None),
            ]
            .into(),
        );
        let start = Instant::now();
        // The first part goes at once; each next one waits for the debt.
        for _ in 0..4 {
            bw.take("slow", 1 << 20).await;
        }
        let took = start.elapsed();
        assert!(
            (Duration::from_millis(2990)..Duration::from_millis(3300)).contains(&took),
            "{took:?}"
        );
        // "free" pays only into the shared bucket, which is 1 MiB in debt.
        let start = Instant::now();
        for _ in 0..5 {
            bw.take("free", 4 << 20).await;
        }
        let took = start.elapsed();
        assert!(
            (Duration::from_millis(4240)..Duration::from_millis(4600)).contains(&took),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lifted_limit_frees_a_waiting_part_at_once() {
        let bw = Bandwidth::new(Some("1MiB".parse().unwrap()), BTreeMap::new());
        bw.take("a", 100 << 20).await;
        let start = Instant::now();
        let waiting = bw.take("a", 1 << 20);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_secs(2), &mut waiting)
                .await
                .is_err(),
            "a part waits out the debt of 100 MiB at 1 MiB/s"
        );
        bw.set(None, BTreeMap::new());
        waiting.await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(bw.limits()[ALL].bytes_per_sec, None);
    }
}
