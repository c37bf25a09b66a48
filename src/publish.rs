//! A publish that is started, not awaited: its frames are queued on lapin's I/O thread, and
//! its write and publisher confirm are looked at later, when the caller is awake anyway.
//!
//! lapin's `basic_publish` resolves only once its I/O thread has written the frames, and the
//! confirm resolves when the broker's verdict comes in. Awaiting either registers a wake-up:
//! one thread hand-off each, which on a small VM costs tens of microseconds, and which lands
//! right when the broker, the peer and the next request need the CPU. [`Publish::start`]
//! polls the publish once with a no-op waker: that hands the frames to the I/O thread and asks
//! for no wake-up. Both sides use it:
//! - the client's request: its reply proves it was routed, so the write and the confirm are
//!   only looked at when the reply is late (returned, nacked, never written);
//! - the daemon's reply: the settler (`server/settle.rs`) acks the request once the reply is
//!   confirmed, looking when it is awake for the next delivery.
//!
//! The confirm still has to end somewhere: lapin keeps every confirm dropped unresolved until
//! the channel's next error (so `wait_for_confirms` can report it), which would grow without
//! bound on a long-lived connection. Dropping a [`Publish`] costs nothing when the write and
//! the confirm are in (the usual case), and hands the rest to a task otherwise.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

/// A `basic_publish` future that owns its channel and body, so it can outlive its caller.
type PublishFuture = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A started publish: its frames are queued; the write and the confirm may still be ahead.
pub struct Publish(State);

enum State {
    Writing(PublishFuture),
    Written(PublisherConfirm),
    Settled,
}

impl Publish {
    /// Publish `body` to `routing_key` on the default exchange: queue the frames without
    /// waiting for them to be written. An error here is the channel refusing at once (closed).
    pub fn start(
        channel: &Channel,
        routing_key: ShortString,
        options: BasicPublishOptions,
        body: Vec<u8>,
        props: BasicProperties,
    ) -> lapin::Result<Self> {
        let channel = channel.clone();
        let publish = Box::pin(async move {
            channel
                .basic_publish("".into(), routing_key, options, &body, props)
                .await
        });
        let mut started = Self(State::Writing(publish));
        started.advance()?;
        Ok(started)
    }

    /// Drive the publish: the write, then the broker's verdict. With a no-op waker this only
    /// asks whether they are in and registers no wake-up.
    pub fn poll_confirmation(&mut self, cx: &mut Context<'_>) -> Poll<lapin::Result<Confirmation>> {
        if let State::Writing(publish) = &mut self.0 {
            let written = std::task::ready!(publish.as_mut().poll(cx));
            // Settled first: on an error the finished future must not be polled again.
            self.0 = State::Settled;
            self.0 = State::Written(written?);
        }
        let State::Written(confirm) = &mut self.0 else {
            panic!("a publish's confirmation is taken once");
        };
        let verdict = std::task::ready!(Pin::new(confirm).poll(cx));
        self.0 = State::Settled;
        Poll::Ready(verdict)
    }

    /// [`poll_confirmation`](Self::poll_confirmation) without a wake-up: `None` while pending.
    pub fn peek(&mut self) -> Option<lapin::Result<Confirmation>> {
        match self.poll_confirmation(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(verdict) => Some(verdict),
            Poll::Pending => None,
        }
    }

    /// Wait for the write, then for the broker's verdict.
    pub async fn confirmation(&mut self) -> lapin::Result<Confirmation> {
        std::future::poll_fn(|cx| self.poll_confirmation(cx)).await
    }

    /// Queue the frames and see whether the write failed at once (a closed channel).
    fn advance(&mut self) -> lapin::Result<()> {
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
}

impl Drop for Publish {
    fn drop(&mut self) {
        if self.advance().is_err() {
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
