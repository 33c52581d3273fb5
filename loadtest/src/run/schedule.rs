//! Open-loop pacing: a connection sends on a fixed schedule whatever the
//! replies do, and latency is measured from the *intended* send time. When
//! the sender falls behind (the gateway stalled it), the late messages go
//! out at once and carry their intended times, so a stall shows up in the
//! latency instead of being hidden (no coordinated omission).

use std::time::Duration;

/// The send schedule of one connection.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Offset of the first send from the epoch.
    first: Duration,
    interval: Duration,
    sent: u64,
}

impl Pacer {
    /// Sends every `interval`, starting at `first` (since the epoch). The
    /// first send of each connection is staggered by the caller so that
    /// connections do not fire in lockstep.
    pub fn new(first: Duration, interval: Duration) -> Self {
        Self {
            first,
            interval,
            sent: 0,
        }
    }

    /// Interval for `rate` messages per second.
    pub fn interval_for(rate: f64) -> Duration {
        Duration::from_secs_f64(1.0 / rate.max(1e-9))
    }

    /// Intended time (since the epoch) of the next message.
    pub fn next_due(&self) -> Duration {
        self.first
            + self
                .interval
                .saturating_mul(u32::try_from(self.sent).unwrap_or(u32::MAX))
    }

    /// Marks the next message as sent; returns its intended time.
    pub fn take(&mut self) -> Duration {
        let due = self.next_due();
        self.sent += 1;
        due
    }

    /// Messages taken so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_schedule_regardless_of_when_taken() {
        let mut p = Pacer::new(Duration::from_millis(5), Duration::from_millis(10));
        assert_eq!(p.take(), Duration::from_millis(5));
        assert_eq!(p.take(), Duration::from_millis(15));
        // Being late does not move the schedule: the next intended time is
        // still on the grid, so the delay counts as latency.
        assert_eq!(p.next_due(), Duration::from_millis(25));
        assert_eq!(p.sent(), 2);
    }

    #[test]
    fn rate_to_interval() {
        assert_eq!(Pacer::interval_for(100.0), Duration::from_millis(10));
        assert_eq!(Pacer::interval_for(10_000.0), Duration::from_micros(100));
    }
}

/// Drives many [`Pacer`]s from one OS thread with sub-millisecond precision.
///
/// The async runtime's timers tick in whole milliseconds, which would add
/// up to 1 ms of the generator's own lateness to every open-loop latency.
/// This thread sleeps with the OS's finer timer and hands each connection
/// its intended send times through an unbounded channel: if the connection
/// is stalled (by the system under test), its due times pile up and go out
/// late, and that lateness is measured, not hidden. The pile is bounded by
/// the run's duration times its rate.
pub mod driver {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};

    use tokio::sync::mpsc::UnboundedSender;

    use super::Pacer;

    /// A connection's registration: its pacer and where its due times go.
    pub struct Registration {
        /// The schedule.
        pub pacer: Pacer,
        /// Receives each intended send time (since the epoch).
        pub due: UnboundedSender<Duration>,
    }

    /// Handle to the pacing thread.
    #[derive(Clone)]
    pub struct Driver {
        register: mpsc::Sender<Registration>,
        stop: Arc<AtomicBool>,
    }

    impl Driver {
        /// Starts the thread; `epoch` is time zero of the schedules.
        pub fn start(epoch: Instant) -> Self {
            let (register, rx) = mpsc::channel::<Registration>();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            std::thread::spawn(move || run(epoch, rx, flag));
            Self { register, stop }
        }

        /// Adds a connection's schedule.
        pub fn add(&self, r: Registration) {
            let _ = self.register.send(r);
        }

        /// Stops the thread (no more due times are produced).
        pub fn stop(&self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn run(epoch: Instant, rx: mpsc::Receiver<Registration>, stop: Arc<AtomicBool>) {
        let mut regs: Vec<Registration> = Vec::new();
        let mut heap: BinaryHeap<Reverse<(Duration, usize)>> = BinaryHeap::new();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(r) = rx.try_recv() {
                heap.push(Reverse((r.pacer.next_due(), regs.len())));
                regs.push(r);
            }
            let Some(Reverse((due, idx))) = heap.peek().copied() else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            let now = epoch.elapsed();
            if due > now {
                // Wake at most every millisecond to pick up registrations.
                std::thread::sleep((due - now).min(Duration::from_millis(1)));
                continue;
            }
            heap.pop();
            let r = &mut regs[idx];
            let t = r.pacer.take();
            if r.due.send(t).is_ok() {
                heap.push(Reverse((r.pacer.next_due(), idx)));
            }
        }
    }
}
