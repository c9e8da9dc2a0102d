//! `site run --busy-poll`: brief, adaptive busy-polling before a one-thread runtime sleeps.
//!
//! A router that has just carried a message is likely to get the answer within tens of
//! microseconds. Sleeping in `epoll_wait` until then costs a wake-up, and on a virtual machine
//! waking an idle vCPU costs about as much as carrying the message. So after its last work the
//! runtime keeps polling its I/O driver without blocking for a while (the window), yielding
//! the core to any other process that is ready to run between polls, and only then sleeps.
//!
//! The window adapts, as Linux's guest halt-polling does: when the runtime slept and was woken
//! again within the longest window, a longer window would have caught that work, so the window
//! doubles; when it slept longer than that, spinning would have been wasted, so the window
//! halves, down to none. Steady request/response traffic keeps it open; an idle site, or one
//! whose work arrives a millisecond apart, does not spin at all. When yielding shows that
//! another process wanted the core, the spin stops at once and the window halves.
//!
//! It is off by default: it buys latency with CPU time, and on a machine whose cores are all
//! busy it costs connection rate (docs/performance.md).

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// A pass through the runtime's loop that takes longer than this ran tasks, not just the
/// spinner: an empty pass is one `epoll_wait` with a zero timeout and one poll of the spinner.
const WORK_GAP: Duration = Duration::from_micros(4);
/// A yield of the core that takes longer than this let another process run.
const CONTENDED: Duration = Duration::from_micros(5);
/// The window a closed spin opens with when it grows.
const FIRST_WINDOW: Duration = Duration::from_micros(10);

/// The longest `--busy-poll` accepts: beyond it a spin costs far more than the wake-up it saves.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

thread_local! {
    static WINDOW: RefCell<Option<Window>> = const { RefCell::new(None) };
    static SPINNER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Installs the spin on a one-thread runtime `builder`: `max` is the longest the runtime keeps
/// polling after its last work before it sleeps. A zero `max` installs nothing; otherwise
/// spawn [`spinner`] on the runtime once it runs.
pub fn install(builder: &mut tokio::runtime::Builder, max: Duration) {
    if max.is_zero() {
        return;
    }
    builder
        .on_thread_park(move || before_park(max))
        .on_thread_unpark(after_unpark);
}

/// The task whose wake-ups keep the runtime polling: spawn it once on a runtime built with
/// [`install`]. It never finishes.
pub async fn spinner() {
    poll_fn(|cx| {
        SPINNER.with(|s| *s.borrow_mut() = Some(cx.waker().clone()));
        Poll::<()>::Pending
    })
    .await
}

fn before_park(max: Duration) {
    let now = Instant::now();
    let spin = WINDOW.with(|w| {
        w.borrow_mut()
            .get_or_insert_with(|| Window::new(max, now))
            .park(now)
    });
    if spin {
        if let Some(waker) = SPINNER.with(|s| s.borrow_mut().take()) {
            // Let any other process that is ready to run on this core have it first.
            std::thread::yield_now();
            if now.elapsed() > CONTENDED {
                WINDOW.with(|w| w.borrow_mut().as_mut().map(|w| w.contended(now)));
            }
            // A woken task makes the runtime poll its driver without blocking, not sleep.
            waker.wake();
        }
    }
    let now = Instant::now();
    WINDOW.with(|w| w.borrow_mut().as_mut().map(|w| w.parked(now)));
}

fn after_unpark() {
    let now = Instant::now();
    WINDOW.with(|w| w.borrow_mut().as_mut().map(|w| w.unpark(now)));
}

/// The adaptive window's bookkeeping, apart from the clock.
#[derive(Debug)]
struct Window {
    /// The longest window (`--busy-poll`).
    max: Duration,
    /// The current window.
    current: Duration,
    /// When the runtime last ran tasks.
    last_work: Instant,
    /// When the runtime last came back from the park hook.
    last_exit: Instant,
    /// When the runtime went to sleep, until it wakes.
    slept_at: Option<Instant>,
}

impl Window {
    /// A closed window: a site spins only once it has seen work come back quickly.
    fn new(max: Duration, now: Instant) -> Window {
        Window {
            max,
            current: Duration::ZERO,
            last_work: now,
            last_exit: now,
            slept_at: None,
        }
    }

    /// The runtime has nothing to do at `now`: true to poll again without blocking, false to
    /// sleep.
    fn park(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_exit) > WORK_GAP {
            self.last_work = now;
        }
        if now.saturating_duration_since(self.last_work) < self.current {
            return true;
        }
        self.slept_at = Some(now);
        false
    }

    /// The park hook returns to the runtime at `now`.
    fn parked(&mut self, now: Instant) {
        self.last_exit = now;
    }

    /// Another process wanted the core during the spin that started at `now`: spinning would
    /// only take turns from it. The spin ends (the next park sleeps unless work came) and the
    /// window halves.
    fn contended(&mut self, now: Instant) {
        self.current /= 2;
        self.last_work = now.checked_sub(self.max).unwrap_or(self.last_work);
    }

    /// The runtime wakes at `now`: after a sleep, the window grows when a spin as long as the
    /// longest would have caught the wake-up, and shrinks (to none) when it would not have.
    fn unpark(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        self.current = if now.saturating_duration_since(slept_at) <= self.max {
            (self.current * 2).max(FIRST_WINDOW).min(self.max)
        } else if self.current / 2 < FIRST_WINDOW {
            Duration::ZERO
        } else {
            self.current / 2
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Drives `window` from work done at `work_done`: spins (one empty pass every 2 µs) while
    /// the window says so, then sleeps until a wake-up `slept` later. Returns when the runtime
    /// comes back, and how long it spun.
    fn rest(window: &mut Window, work_done: Instant, slept: Duration) -> (Instant, Duration) {
        let mut now = work_done;
        while window.park(now) {
            window.parked(now + US);
            now += 2 * US;
            assert!(
                now - work_done <= window.max,
                "spun past the longest window"
            );
        }
        let woke = now + slept;
        window.unpark(woke);
        window.parked(woke);
        (woke, now - work_done)
    }

    #[test]
    fn an_idle_site_never_spins() {
        let start = Instant::now();
        let mut window = Window::new(200 * US, start);
        let mut now = start;
        for _ in 0..10 {
            let spun;
            (now, spun) = rest(&mut window, now + 50 * US, Duration::from_secs(1));
            assert_eq!(spun, Duration::ZERO);
            assert_eq!(window.current, Duration::ZERO);
        }
    }

    #[test]
    fn quick_replies_open_the_window_up_to_the_longest() {
        let start = Instant::now();
        let mut window = Window::new(50 * US, start);
        let mut now = start;
        let mut seen = Vec::new();
        for _ in 0..5 {
            // Work (a pass longer than WORK_GAP), then a sleep the next message ends in 30 µs.
            let spun;
            (now, spun) = rest(&mut window, now + 20 * US, 30 * US);
            seen.push((spun.as_micros(), window.current.as_micros()));
        }
        assert_eq!(seen, [(0, 10), (10, 20), (20, 40), (40, 50), (50, 50)]);
        // Work that comes during a spin (a pass longer than WORK_GAP) starts the window again.
        let work_done = now + 20 * US;
        assert!(window.park(work_done));
        window.parked(work_done + US);
        let (_, spun) = rest(&mut window, work_done + 30 * US, Duration::from_secs(1));
        assert_eq!(spun, 50 * US);
    }

    #[test]
    fn slow_replies_close_the_window() {
        let start = Instant::now();
        let mut window = Window::new(200 * US, start);
        window.current = 200 * US;
        let mut now = start;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let spun;
            (now, spun) = rest(&mut window, now + 20 * US, Duration::from_millis(1));
            seen.push((spun.as_micros(), window.current.as_micros()));
        }
        assert_eq!(
            seen,
            [(200, 100), (100, 50), (50, 25), (26, 12), (14, 0), (0, 0)]
        );
    }

    #[test]
    fn a_contended_core_ends_the_spin_and_halves_the_window() {
        let start = Instant::now();
        let mut window = Window::new(100 * US, start);
        window.current = 100 * US;
        let work_done = start + 20 * US;
        assert!(window.park(work_done));
        window.contended(work_done);
        window.parked(work_done + 2 * US);
        assert_eq!(window.current, 50 * US);
        assert!(
            !window.park(work_done + 3 * US),
            "kept spinning on a contended core"
        );
    }
}
