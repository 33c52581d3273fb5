//! The channel under a session's mailbox: the link's reader pushes without
//! waiting, the session takes in order.
//!
//! Why not tokio's `mpsc`: it allocates a block of 32 slots when it is
//! made, 1.3 KiB for every session whether or not the backend ever sends it
//! anything, and keeps it. This one allocates nothing until a message
//! comes, keeps room for a few once it has, and gives back what a burst
//! made it grow (issue 12: an idle session costs only what it must). It has no bound of its own: the mailbox bounds its
//! bytes (see `mailbox.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};

/// A queue that has emptied keeps room for this many messages; a larger
/// one (grown by a burst) is given back.
const KEPT_ROOM: usize = 8;

struct Chan<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    queue: VecDeque<T>,
    senders: usize,
    receiver: bool,
    /// The receiver waiting; woken after a push, and when the last sender
    /// goes.
    waiting: Option<Waker>,
}

impl<T> State<T> {
    /// The next message; gives back the room of a queue a burst grew.
    fn pop(&mut self) -> Option<T> {
        let msg = self.queue.pop_front();
        if self.queue.is_empty() && self.queue.capacity() > KEPT_ROOM {
            self.queue = VecDeque::new();
        }
        msg
    }
}

impl<T> Chan<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock; if something ever did, the
        // queue is still a consistent queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The pushing end; clones share the channel, which ends (for the
/// receiver, once it is empty) when the last sender is dropped.
pub(super) struct Sender<T>(Arc<Chan<T>>);

/// The taking end.
pub(super) struct Receiver<T>(Arc<Chan<T>>);

/// A channel with one sender and its receiver.
pub(super) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let chan = Arc::new(Chan {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            receiver: true,
            waiting: None,
        }),
    });
    (Sender(chan.clone()), Receiver(chan))
}

impl<T> Sender<T> {
    /// Queues `msg` without waiting; gives it back if the receiver is gone.
    pub(super) fn send(&self, msg: T) -> Result<(), T> {
        let waiting = {
            let mut s = self.0.state();
            if !s.receiver {
                return Err(msg);
            }
            s.queue.push_back(msg);
            s.waiting.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver is gone.
    pub(super) fn is_closed(&self) -> bool {
        !self.0.state().receiver
    }

    /// How many messages wait to be taken.
    pub(super) fn depth(&self) -> usize {
        self.0.state().queue.len()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.state().senders += 1;
        Self(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut s = self.0.state();
            s.senders -= 1;
            if s.senders == 0 {
                s.waiting.take()
            } else {
                None
            }
        };
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// How many messages wait to be taken.
    pub(super) fn depth(&self) -> usize {
        self.0.state().queue.len()
    }

    /// The next message if one is queued.
    pub(super) fn try_recv(&mut self) -> Option<T> {
        self.0.state().pop()
    }

    /// The next message, in order; `None` once every sender is gone and
    /// the queue is empty. Cancel-safe: a message is taken only when this
    /// returns it.
    pub(super) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Like tokio's own channels, take part in the task's budget: a
        // session loop whose every other branch is out of budget must not
        // spin on a channel that keeps answering.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let mut s = self.0.state();
        if let Some(msg) = s.pop() {
            coop.made_progress();
            return Poll::Ready(Some(msg));
        }
        if s.senders == 0 {
            coop.made_progress();
            return Poll::Ready(None);
        }
        // Looked at and registered under one lock: no push is missed.
        match &s.waiting {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waiting = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // What was queued goes now, not with the last sender; so does the
        // waker, which holds the session's task.
        let (queue, waker) = {
            let mut s = self.0.state();
            s.receiver = false;
            (std::mem::take(&mut s.queue), s.waiting.take())
        };
        drop((queue, waker));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_come_in_order_and_the_channel_ends_with_its_last_sender() {
        let (tx, mut rx) = channel();
        let spare = tx.clone();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        drop(tx);
        for i in 0..100 {
            assert_eq!(rx.recv().await, Some(i));
        }
        spare.send(100).unwrap();
        drop(spare);
        assert_eq!(rx.recv().await, Some(100));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_push_from_another_thread() {
        let (tx, mut rx) = channel();
        let pusher = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.send(i).unwrap();
                if i % 7 == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        for i in 0..1000 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert_eq!(got.unwrap(), Some(i));
        }
        pusher.join().unwrap();
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = channel();
        // Cancelled while waiting: nothing was taken.
        assert!(tokio::time::timeout(Duration::from_millis(10), rx.recv())
            .await
            .is_err());
        tx.send(1).unwrap();
        assert_eq!(rx.recv().await, Some(1));
    }

    #[tokio::test]
    async fn an_ended_channel_still_lets_the_task_yield() {
        // A session loop that keeps hearing "ended" must still run out of
        // budget, or its other branches (timers, sockets) would never run.
        let (tx, mut rx) = channel::<u8>();
        drop(tx);
        let mut yielded = false;
        for _ in 0..1000 {
            let poll = std::future::poll_fn(|cx| Poll::Ready(rx.poll_recv(cx))).await;
            match poll {
                Poll::Ready(v) => assert_eq!(v, None),
                Poll::Pending => {
                    yielded = true;
                    break;
                }
            }
        }
        assert!(yielded, "the task's budget never ran out");
    }

    #[test]
    fn a_send_to_a_dropped_receiver_is_refused_and_the_queue_is_freed() {
        let (tx, rx) = channel();
        let held = Arc::new(());
        tx.send(held.clone()).unwrap();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(Arc::strong_count(&held), 1, "queued message dropped");
        assert!(tx.send(held).is_err());
    }

    #[test]
    fn an_emptied_queue_gives_back_what_a_burst_grew() {
        let (tx, mut rx) = channel();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        assert_eq!(tx.depth(), 1000);
        while rx.try_recv().is_some() {}
        assert_eq!(tx.depth(), 0);
        assert_eq!(rx.0.state().queue.capacity(), 0);
        // A queue that never grew past a few keeps its room.
        tx.send(1).unwrap();
        rx.try_recv().unwrap();
        assert!(rx.0.state().queue.capacity() <= KEPT_ROOM);
    }
}
