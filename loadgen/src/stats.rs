//! Latency histograms (HdrHistogram, microseconds), the per-second timeline, and errors by
//! code. Connection tasks record into a local [`Recorder`] and fold it into the shared
//! [`Stats`] once per read batch, so the lock is taken per batch, not per message.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::population::Class;

/// The largest latency a histogram holds (one hour); larger values are clamped to it.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e}"),
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// (percentile, microseconds) points of a latency curve, for charts.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, u64)> = h
        .iter_quantiles(4)
        .map(|v| (v.quantile_iterated_to() * 100.0, v.value_iterated_to()))
        .filter(|&(p, _)| p < 100.0)
        .collect();
    points.push((100.0, h.max()));
    points
}

/// Latencies of one phase.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// From the scheduled send time to the recipient's read, per class, for deliveries to
    /// devices that were online when the message was due.
    pub classes: [Histogram<u64>; 2],
    /// From loadgen's actual write to the read (what the relay and the network add).
    pub from_write: Histogram<u64>,
    /// The same per class.
    pub from_write_classes: [Histogram<u64>; 2],
    /// Interop latency (from the scheduled time) by architecture: [both ends through
    /// servers, a device session at either end].
    pub interop_by_architecture: [Histogram<u64>; 2],
    /// Deliveries to devices that were offline when the message was due (store and forward).
    pub catchup: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            classes: [new_histogram(), new_histogram()],
            from_write: new_histogram(),
            from_write_classes: [new_histogram(), new_histogram()],
            interop_by_architecture: [new_histogram(), new_histogram()],
            catchup: new_histogram(),
        }
    }
}

impl Latencies {
    pub fn add(&mut self, other: &Latencies) {
        for (mine, theirs) in self.classes.iter_mut().zip(other.classes.iter()) {
            // Same bounds on both sides, so adding cannot fail.
            let _ = mine.add(theirs);
        }
        let _ = self.from_write.add(&other.from_write);
        let _ = self.catchup.add(&other.catchup);
        for (mine, theirs) in self
            .from_write_classes
            .iter_mut()
            .zip(&other.from_write_classes)
        {
            let _ = mine.add(theirs);
        }
        for (mine, theirs) in self
            .interop_by_architecture
            .iter_mut()
            .zip(&other.interop_by_architecture)
        {
            let _ = mine.add(theirs);
        }
    }

    pub fn clear(&mut self) {
        for h in &mut self.classes {
            h.reset();
        }
        self.from_write.reset();
        self.catchup.reset();
        for h in self
            .from_write_classes
            .iter_mut()
            .chain(self.interop_by_architecture.iter_mut())
        {
            h.reset();
        }
    }

    /// Both classes together.
    pub fn all(&self) -> Histogram<u64> {
        let mut all = self.classes[0].clone();
        let _ = all.add(&self.classes[1]);
        all
    }
}

/// One latency sample a connection task took, waiting to be folded.
#[derive(Debug, Clone, Copy)]
enum Sample {
    Online {
        class: Class,
        direct: bool,
        latency_us: u64,
        from_write_us: u64,
    },
    Catchup {
        latency_us: u64,
    },
}

/// What one connection task gathered since its last fold: raw samples, not histograms (a
/// histogram of this range is half a megabyte, and there is a task per device session).
#[derive(Debug, Default)]
pub struct Recorder {
    samples: Vec<Sample>,
    pub dirty: bool,
}

impl Recorder {
    /// A delivery to a device online since before the message was due; `direct` when a
    /// device session is at either end.
    pub fn record(&mut self, class: Class, direct: bool, latency_us: u64, from_write_us: u64) {
        self.samples.push(Sample::Online {
            class,
            direct,
            latency_us: latency_us.clamp(1, LATENCY_US_MAX),
            from_write_us: from_write_us.clamp(1, LATENCY_US_MAX),
        });
        self.dirty = true;
    }

    pub fn record_catchup(&mut self, latency_us: u64) {
        self.samples.push(Sample::Catchup {
            latency_us: latency_us.clamp(1, LATENCY_US_MAX),
        });
        self.dirty = true;
    }

    /// Forgets what was gathered.
    pub fn clear(&mut self) {
        self.samples.clear();
        self.dirty = false;
    }
}

impl Latencies {
    fn record(&mut self, sample: Sample, interval: &mut Histogram<u64>) {
        match sample {
            Sample::Online {
                class,
                direct,
                latency_us,
                from_write_us,
            } => {
                let _ = self.classes[class.index()].record(latency_us);
                let _ = self.from_write.record(from_write_us);
                let _ = self.from_write_classes[class.index()].record(from_write_us);
                if class == Class::Interop {
                    let _ = self.interop_by_architecture[usize::from(direct)].record(latency_us);
                }
                let _ = interval.record(latency_us);
            }
            Sample::Catchup { latency_us } => {
                let _ = self.catchup.record(latency_us);
            }
        }
    }
}

/// One second of a phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    /// Messages written so far.
    pub sent: u64,
    /// Device deliveries so far.
    pub deliveries: u64,
    /// Device deliveries in this interval, per second.
    pub deliveries_per_s: f64,
    /// p99 latency of this interval's deliveries, both classes, microseconds.
    pub p99_us: u64,
    pub errors: u64,
}

/// Errors by protocol code, and client-side failures by kind.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors {
    /// code → count, for refusals (rejected acks) and error frames.
    pub by_code: BTreeMap<u16, u64>,
    /// Failures that carry no protocol code: connection errors, decode errors.
    pub other: BTreeMap<String, u64>,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.by_code.values().sum::<u64>() + self.other.values().sum::<u64>()
    }

    /// For the report: `{"400": {"name": "QUEUE_FULL", "count": 3}, ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut by_code = serde_json::Map::new();
        for (&code, &count) in &self.by_code {
            let name = codec::ErrorCode::from_u16(code).map_or("UNKNOWN", codec::ErrorCode::name);
            by_code.insert(
                code.to_string(),
                serde_json::json!({ "name": name, "count": count }),
            );
        }
        serde_json::json!({
            "total": self.total(),
            "by_code": by_code,
            "other": self.other,
        })
    }
}

#[derive(Debug, Default)]
struct Shared {
    latencies: Latencies,
    interval: Option<hdrhistogram::Histogram<u64>>,
    errors: Errors,
    timeline: Vec<TimelinePoint>,
}

/// The statistics of one phase, shared by its tasks.
#[derive(Debug, Default)]
pub struct Stats {
    shared: Mutex<Shared>,
}

impl Stats {
    pub fn fold(&self, recorder: &mut Recorder) {
        if !recorder.dirty {
            return;
        }
        let mut shared = self.lock();
        let Shared {
            latencies,
            interval,
            ..
        } = &mut *shared;
        let interval = interval.get_or_insert_with(new_histogram);
        for sample in recorder.samples.drain(..) {
            latencies.record(sample, interval);
        }
        drop(shared);
        recorder.dirty = false;
        // A burst must not leave a large buffer behind in every task.
        if recorder.samples.capacity() > 4096 {
            recorder.samples = Vec::new();
        }
    }

    pub fn error_code(&self, code: u16) {
        *self.lock().errors.by_code.entry(code).or_insert(0) += 1;
    }

    pub fn error_other(&self, what: impl Into<String>) {
        *self.lock().errors.other.entry(what.into()).or_insert(0) += 1;
    }

    /// Takes the current interval's p99 and count, and starts a new interval.
    pub fn take_interval(&self) -> (u64, u64) {
        let mut shared = self.lock();
        match shared.interval.take() {
            Some(h) if !h.is_empty() => (h.value_at_quantile(0.99), h.len()),
            _ => (0, 0),
        }
    }

    /// p99 so far, both classes.
    pub fn p99_so_far_us(&self) -> u64 {
        let shared = self.lock();
        let all = shared.latencies.all();
        if all.is_empty() {
            0
        } else {
            all.value_at_quantile(0.99)
        }
    }

    pub fn push_point(&self, point: TimelinePoint) {
        self.lock().timeline.push(point);
    }

    pub fn timeline(&self) -> Vec<TimelinePoint> {
        self.lock().timeline.clone()
    }

    pub fn errors(&self) -> Errors {
        self.lock().errors.clone()
    }

    pub fn latencies(&self) -> Latencies {
        self.lock().latencies.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panicking task cannot leave the histograms half-updated in a way that matters.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_fold_into_the_shared_stats() {
        let stats = Stats::default();
        let mut recorder = Recorder::default();
        for us in 1..=1000 {
            recorder.record(Class::FirstParty, false, us, us / 2);
        }
        recorder.record(Class::Interop, true, 5000, 10);
        recorder.record_catchup(9_000_000);
        stats.fold(&mut recorder);
        assert!(!recorder.dirty);
        let latencies = stats.latencies();
        let first = LatencySummary::of(&latencies.classes[0]);
        assert_eq!(first.count, 1000);
        assert!((495..=505).contains(&first.p50), "{first:?}");
        // Values are kept to 3 significant digits.
        let max = LatencySummary::of(&latencies.classes[1]).max;
        assert!((4995..=5005).contains(&max), "{max}");
        assert_eq!(latencies.catchup.len(), 1);
        let (p99, count) = stats.take_interval();
        assert_eq!(count, 1001);
        assert!(p99 >= 980);
        assert_eq!(stats.take_interval(), (0, 0));
        let curve = percentile_curve(&latencies.classes[0]);
        assert!(curve.len() > 5);
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn errors_are_named() {
        let stats = Stats::default();
        stats.error_code(400);
        stats.error_code(400);
        stats.error_other("connect");
        let json = stats.errors().to_json();
        assert_eq!(json["by_code"]["400"]["name"], "QUEUE_FULL");
        assert_eq!(json["by_code"]["400"]["count"], 2);
        assert_eq!(json["total"], 3);
    }
}
