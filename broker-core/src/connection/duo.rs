//! The reader and the writer of one connection, polled by its one task so
//! that a hand-off from one to the other costs no wake-up of the task.
//!
//! The reader gives the writer work while the task is running: an
//! acknowledgement through the control channel, a window opened in the
//! outbox by a PUBACK. Each wakes the writer's waker. Were that the task's
//! own waker (as under `tokio::select!`), the task would be woken while it
//! is being polled, and tokio reschedules such a task as a yield: to the
//! back of the worker's queue, with another worker woken (a futex, and on
//! a virtual machine a virtual-CPU kick) to steal it. That was one
//! spurious cross-worker wake-up per packet at low rates.
//!
//! Here the writer is polled with a waker of its own. Woken while the task
//! is polling, it only marks the writer to be polled again before the
//! poll returns; woken from anywhere else (a publisher on another task
//! queueing a message), it wakes the task.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// The task is polling the pair: a wake only sets [`WOKEN`].
const POLLING: u8 = 1;
/// The writer was woken since it was last polled.
const WOKEN: u8 = 2;

/// The writer's waker.
#[derive(Default)]
struct WriterWake {
    state: AtomicU8,
    /// The task's waker, registered at each poll.
    task: AtomicWaker,
}

impl Wake for WriterWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }
}

/// Poll `reader` until it ends, and `writer` beside it until it ends
/// (`writer_done` then set); the reader's output. The writer left
/// unfinished is polled again by the caller with the task's own waker,
/// which every resource it waits on re-registers at its next poll.
pub(super) async fn run<C>(
    mut reader: Pin<&mut (dyn Future<Output = C> + Send)>,
    mut writer: Pin<&mut (dyn Future<Output = ()> + Send)>,
    writer_done: &mut bool,
) -> C {
    let wake = Arc::new(WriterWake::default());
    let writer_waker = Waker::from(wake.clone());
    poll_fn(move |cx| {
        wake.task.register(cx.waker());
        wake.state.store(POLLING, Ordering::Release);
        if let Poll::Ready(close) = reader.as_mut().poll(cx) {
            wake.state.store(0, Ordering::Release);
            return Poll::Ready(close);
        }
        // Until the writer is pending with nothing woken it meanwhile (by
        // the reader above, by its own progress, or by another thread).
        while !*writer_done {
            wake.state.fetch_and(!WOKEN, Ordering::AcqRel);
            let mut writer_cx = Context::from_waker(&writer_waker);
            if writer.as_mut().poll(&mut writer_cx).is_ready() {
                *writer_done = true;
            } else if wake.state.load(Ordering::Acquire) & WOKEN == 0 {
                break;
            }
        }
        // A wake that landed after the last look must not be lost.
        if wake.state.swap(0, Ordering::AcqRel) & WOKEN != 0 && !*writer_done {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::mpsc;

    /// A waker that counts its wakes, and its count.
    fn counting_waker() -> (Waker, Arc<AtomicUsize>) {
        struct Count(Arc<AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(count.clone()))), count)
    }

    /// A writer that counts what it receives until the channel closes, and its count.
    fn counting_writer(
        mut rx: mpsc::Receiver<u32>,
    ) -> (impl Future<Output = ()> + Send, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        let writer = async move {
            while rx.recv().await.is_some() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        };
        (writer, count)
    }

    #[tokio::test]
    async fn a_hand_off_to_the_writer_does_not_wake_the_task() {
        let (tx, rx) = mpsc::channel::<u32>(8);
        // The reader hands over three items, one per poll, then ends.
        let mut sent = 0;
        let mut reader = std::pin::pin!(poll_fn(move |cx| {
            if sent == 3 {
                return Poll::Ready(sent);
            }
            sent += 1;
            let _ = tx.try_send(sent);
            cx.waker().wake_by_ref(); // the reader's own reason to run again
            Poll::Pending
        }));
        let (writer, seen) = counting_writer(rx);
        let mut writer = std::pin::pin!(writer);
        let mut done = false;
        let mut pair = std::pin::pin!(run(reader.as_mut(), writer.as_mut(), &mut done));
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        for n in 1..=3 {
            assert!(pair.as_mut().poll(&mut cx).is_pending());
            // The writer took the item in the same poll ...
            assert_eq!(seen.load(Ordering::Relaxed), n);
            // ... and the only wake is the reader's own.
            assert_eq!(wakes.load(Ordering::Relaxed), n);
        }
        assert_eq!(pair.as_mut().poll(&mut cx), Poll::Ready(3));
    }

    #[tokio::test]
    async fn a_wake_from_elsewhere_wakes_the_task() {
        let (tx, rx) = mpsc::channel::<u32>(8);
        let mut reader = std::pin::pin!(futures::future::pending::<()>());
        let (writer, got) = counting_writer(rx);
        let mut writer = std::pin::pin!(writer);
        let mut done = false;
        {
            let mut pair = std::pin::pin!(run(reader.as_mut(), writer.as_mut(), &mut done));
            let (waker, wakes) = counting_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(pair.as_mut().poll(&mut cx).is_pending());
            assert_eq!(wakes.load(Ordering::Relaxed), 0);
            // Sent from another thread, outside any poll of the pair.
            let sent = std::thread::spawn(move || tx.try_send(7).is_ok()).join();
            assert!(matches!(sent, Ok(true)));
            assert_eq!(wakes.load(Ordering::Relaxed), 1);
            // The sender is gone too: the writer ends, the reader goes on.
            assert!(pair.as_mut().poll(&mut cx).is_pending());
            assert_eq!(got.load(Ordering::Relaxed), 1);
        }
        assert!(done);
    }
}
