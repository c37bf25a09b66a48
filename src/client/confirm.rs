//! A request's publish, and its publisher confirm, which the caller looks at only when it
//! matters.
//!
//! A reply proves that its request was routed, so a call that gets its reply never needs the
//! confirm, nor even to hear that the request's frames were written. lapin's `basic_publish`
//! resolves only once its I/O thread has written the frames, and awaiting that costs the call a
//! thread wake-up before it can wait for its reply: on the latency path, at one call in flight.
//! [`Publish::start`] polls the publish once with a no-op waker instead: that hands the frames
//! to the I/O thread and asks for no wake-up. The outcome is looked at after the reply, or when
//! the reply is late.
//!
//! The confirm still has to end somewhere: lapin keeps every confirm dropped unresolved until
//! the channel's next error (so `wait_for_confirms` can report it), which would grow without
//! bound on a long-lived client. Dropping a [`Publish`] costs nothing when the write and the
//! confirm are in (the usual case, since the broker confirms before it delivers), and hands the
//! rest to a task otherwise.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use lapin::{Confirmation, PublisherConfirm};

/// A `basic_publish` future that owns its channel and body, so it can outlive the call.
pub(crate) type PublishFuture =
    Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'static>>;

/// A started publish: its frames are queued; the write and the confirm may still be ahead.
pub(crate) struct Publish(State);

enum State {
    Writing(PublishFuture),
    Written(PublisherConfirm),
    Settled,
}

impl Publish {
    /// Queue the publish's frames without waiting for them to be written. An error here is
    /// the channel refusing at once (closed).
    pub fn start(publish: PublishFuture) -> lapin::Result<Self> {
        let mut started = Self(State::Writing(publish));
        started.peek()?;
        Ok(started)
    }

    /// Advance without registering a wake-up: only asks whether the write is done.
    fn peek(&mut self) -> lapin::Result<()> {
        if let State::Writing(publish) = &mut self.0 {
            let mut cx = Context::from_waker(Waker::noop());
            match publish.as_mut().poll(&mut cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(confirm)) => self.0 = State::Written(confirm),
                Poll::Ready(Err(e)) => {
                    self.0 = State::Settled;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Wait for the write, then for the broker's verdict.
    pub async fn confirmation(&mut self) -> lapin::Result<Confirmation> {
        if let State::Writing(publish) = &mut self.0 {
            let written = publish.await;
            // Settled first: on an error the finished future must not be polled again.
            self.0 = State::Settled;
            self.0 = State::Written(written?);
        }
        let State::Written(confirm) = &mut self.0 else {
            panic!("a publish's confirmation is awaited once");
        };
        let verdict = confirm.await;
        self.0 = State::Settled;
        verdict
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        if self.peek().is_err() {
            return; // the write failed: there is no confirm to keep
        }
        match std::mem::replace(&mut self.0, State::Settled) {
            State::Settled => {}
            State::Written(mut confirm) => {
                // Polled with a no-op waker: only asks whether the verdict is in. It almost
                // always is, when a reply came.
                let mut cx = Context::from_waker(Waker::noop());
                if Pin::new(&mut confirm).poll(&mut cx).is_pending() {
                    spawn(async move {
                        let _ = confirm.await;
                    });
                }
            }
            State::Writing(publish) => spawn(async move {
                if let Ok(confirm) = publish.await {
                    let _ = confirm.await;
                }
            }),
        }
    }
}

fn spawn(settle: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(settle);
    }
}
